"""Errors mean what they say, on real Serve, through HTTP, on the spec's /inference
routes and OpenAI's /v1, streaming and not:

- a request the engine refuses (its protocol's EngineRequestError) is 422 with the
  engine's message;
- a replica that is out of memory, dead, or never started is 503 with Retry-After;
- any other exception in the replica is an engine bug: 500, logged with the replica's
  own traceback, and no internals in the body;
- a registration whose app fails to start is 503 (not the client's fault), while a
  checkpoint that can be seen to be unreadable before deploying is 422.

The probe engine implements the real engine protocol and fails as its prompt says."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.services.models import build_model_service
from corral.serving.catalog import ModelRoots, ModelSpec, file_app_name, tenant_app_name
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from tests.conftest import add_registered_model_row
from tests.serve_apps.probe_engine import Records, probe_engine, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = {"Authorization": "Bearer key-alpha"}
SAMPLING = {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0}


def _database(directory: Path) -> Database:
    url = f"sqlite:///{directory / 'corral.db'}"
    migrate.upgrade(url)
    return Database(url)


def _checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture(scope="module")
def client(serve_instance: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app over a started registry serving one probe model as `llama3_8b_chat`
    (and `llama3_8b`, which the spec's completion takes)."""
    home = tmp_path_factory.mktemp("errors-home")
    records = Records(home / "records")
    spec = ModelSpec(
        name=f"faulty-{uuid.uuid4().hex[:6]}",
        aliases=["llama3_8b_chat", "llama3_8b"],
        checkpoint_dir=_checkpoint(home / "checkpoint"),
        cpus_per_replica=0.25,
    )
    database = _database(home)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=120),
        file_models=[spec],
        model_roots=ModelRoots(shared=()),
        engine_factory=partial(probe_engine, records.config()),
    )
    registry.start()
    app = create_app(
        Settings(home=home, api_keys="alpha:key-alpha"), database=database, models=registry
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        serve.delete(file_app_name(spec.name))
        database.dispose()


def _spec_chat(prompt: str, stream: bool) -> dict[str, Any]:
    message = {"role": "user", "content": prompt, "tool_calls": [], "tool_responses": []}
    return {
        "model": "llama3_8b_chat",
        "dialog": {"message": message, "message_history": []},
        "sampling_params": SAMPLING,
        "available_tools": [],
        "max_tokens": 0,
        "stream": stream,
        "logprobs": False,
    }


def _spec_completion(prompt: str, stream: bool) -> dict[str, Any]:
    return {
        "model": "llama3_8b",
        "content": prompt,
        "sampling_params": SAMPLING,
        "max_tokens": 0,
        "stream": stream,
        "logprobs": False,
    }


def _openai_chat(prompt: str, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": prompt}]
    return {"model": "llama3_8b_chat", "messages": messages, "stream": stream}


def _openai_completion(prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": "llama3_8b_chat", "prompt": prompt, "stream": stream}


ROUTES = {
    "/inference/chat_completion": _spec_chat,
    "/inference/completion": _spec_completion,
    "/v1/chat/completions": _openai_chat,
    "/v1/completions": _openai_completion,
}
CASES = [(route, stream) for route in ROUTES for stream in (False, True)]


def _post(client: TestClient, route: str, prompt: str, stream: bool) -> Any:
    return client.post(route, json=ROUTES[route](prompt, stream), headers=KEY)


def _error(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


@pytest.mark.parametrize(("route", "stream"), CASES)
def test_a_request_the_engine_refuses_is_422_with_its_message(
    client: TestClient, route: str, stream: bool
) -> None:
    response = _post(client, route, "refuse", stream)
    assert response.status_code == 422, response.text
    error = _error(response)
    assert error["code"] == "invalid_request"
    assert error["message"] == "probe engine refuses this prompt"
    if route.startswith("/v1"):
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("route", "stream"), CASES)
def test_an_engine_bug_is_500_logged_with_the_replica_traceback(
    client: TestClient, route: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="corral.services.model_calls"):
        response = _post(client, route, "crash", stream)
    assert response.status_code == 500, response.text
    error = _error(response)
    assert error["code"] == "engine_failed"
    assert "crashed on purpose" not in response.text  # no internals for the client
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.endswith("model_calls"))
    # The replica's own traceback: the engine's frame and its message.
    assert "probe_engine.py" in logged and "in _steps" in logged, logged
    assert "RuntimeError: probe engine bug: crashed on purpose" in logged


@pytest.mark.parametrize(("route", "stream"), CASES)
def test_a_replica_out_of_memory_is_503_with_retry_after(
    client: TestClient, route: str, stream: bool
) -> None:
    response = _post(client, route, "oom", stream)
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "5"
    assert _error(response)["code"] == "model_unavailable"


def test_an_engine_bug_mid_stream(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    """After the stream has started its status is sent: OpenAI's stream ends with an
    error event (its clients raise it) and no [DONE]; the spec's stream, which has no
    error event, is cut short without its final chunk. Both are logged."""
    with caplog.at_level(logging.ERROR, logger="corral.services.model_calls"):
        openai = _post(client, "/v1/chat/completions", "crash-midstream", True)
        spec = _post(client, "/inference/chat_completion", "crash-midstream", True)
    assert openai.status_code == 200
    events = [line[6:] for line in openai.text.splitlines() if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    error = json.loads(events[-1])["error"]
    assert (error["code"], error["type"]) == ("engine_failed", "server_error")
    assert spec.status_code == 200
    chunks = [json.loads(line[6:]) for line in spec.text.splitlines() if line.startswith("data: ")]
    assert [c["stop_reason"] for c in chunks] == ["not_stopped"] * 2  # no final chunk
    logged = [r for r in caplog.records if "crashed mid-stream on purpose" in r.getMessage()]
    assert len(logged) == 2


@pytest.mark.parametrize("route", ["/inference/chat_completion", "/v1/chat/completions"])
def test_a_dead_replica_is_503_with_retry_after_and_serve_replaces_it(
    client: TestClient, route: str
) -> None:
    for stream in (False, True):
        response = _post(client, route, "die", stream)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert _error(response)["code"] == "model_unavailable"

        def served_again() -> bool:
            # While Serve replaces the replica, requests get 503 too (never a 4xx or 500).
            again = _post(client, route, "hello", False)
            assert again.status_code in (200, 503), again.text
            return bool(again.status_code == 200)

        wait_for(served_again, "Serve to replace the dead replica", 90)


def test_a_deploy_that_fails_is_503_and_a_failed_app_answers_503(
    serve_instance: None, tmp_path: Path
) -> None:
    """Registration whose replicas cannot start (out of memory while loading): 503 with
    Retry-After, nothing registered. A registered model restored after a restart whose
    app failed to deploy answers 503 too (Serve's DeploymentUnavailableError)."""
    records = Records(tmp_path / "records")
    roots = tmp_path / "models"
    checkpoint = _checkpoint(roots / "oom")
    database = _database(tmp_path)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=120),
        file_models=[],
        model_roots=ModelRoots(shared=(roots,)),
        engine_factory=partial(probe_engine, records.config(fail_on_start="oom")),
    )
    tenant = f"t{uuid.uuid4().hex[:6]}"
    app = create_app(
        Settings(home=tmp_path, api_keys=f"{tenant}:key-alpha"), database=database, models=registry
    )
    body = {"name": "llama3_8b_chat", "checkpoint_dir": str(checkpoint)}
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            # Told before deploying: the client's to fix.
            broken = _checkpoint(roots / "broken")
            (broken / "config.json").write_text("{not json")
            refused = client.post(
                "/models/register", json=body | {"checkpoint_dir": str(broken)}, headers=KEY
            )
            assert refused.status_code == 422, refused.text
            assert "config.json is not a readable JSON object" in _error(refused)["message"]

            failed = client.post("/models/register", json=body, headers=KEY)
            assert failed.status_code == 503, failed.text
            assert failed.headers["retry-after"] == "30"
            error = _error(failed)
            assert error["code"] == "model_deploy_failed"
            assert "MemoryError" in error["message"]
            assert client.get("/models", headers=KEY).json()["data"] == []

            # As another API process would have registered it, before Serve lost the app.
            add_registered_model_row(
                database, tenant=tenant, name="llama3_8b_chat", checkpoint_dir=checkpoint
            )
            registry.restore()  # logs that the app did not start, and goes on
            status = ServeDeployer().status(tenant_app_name(tenant, "llama3_8b_chat"))
            assert status.status == "DEPLOY_FAILED"
            for route, stream in [
                ("/inference/chat_completion", False),
                ("/v1/chat/completions", True),
            ]:
                response = _post(client, route, "hello", stream)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "30"
                error = _error(response)
                assert error["code"] == "model_unavailable"
                assert "failed to start" in error["message"]
    finally:
        serve.delete(tenant_app_name(tenant, "llama3_8b_chat"))
        database.dispose()
