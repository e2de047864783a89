"""A stream whose client goes away stops generating on the replica and frees it.

Real Serve, the real app and registry, over real HTTP; the probe engine (the real engine
protocol) records every token it generates in files, so the test sees the replica itself
stop. Two ways a stream loses its reader: the client disconnects (the API server closes
the stream and cancels the Serve request), or the API process dies (SIGKILL: nothing in
it runs again, so the replica must notice on its own). Each request asks for 600 tokens
at 50 ms a token: 30 s, far longer than the test waits. The client side of an API crash
(the stream's reader sees a clean end) is the chaos tests' business."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.services.models import build_model_service
from corral.serving.catalog import ModelRoots, ModelSpec, file_app_name
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from tests.api.live_server import live_server
from tests.serve_apps.probe_engine import Records, probe_engine, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = {"Authorization": "Bearer key-alpha"}
LONG = 600  # tokens a request asks for: 30 s of decoding
STEP_S = 0.05
PROMPT_TIMEOUT_S = 10.0  # what "served at once" allows on a loaded 2-core CI machine
API_SCRIPT = Path(__file__).with_name("api_process.py")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Records:
    return Records(tmp_path_factory.mktemp("probe-records"))


@pytest.fixture(scope="module")
def spec(
    serve_instance: None, records: Records, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ModelSpec]:
    """One probe model (one replica, so a stream that is not stopped blocks the next
    request), deployed by the test process's own registry."""
    checkpoint = tmp_path_factory.mktemp("probe-checkpoint")
    (checkpoint / "config.json").write_text("{}")
    spec = ModelSpec(
        name=f"probe-{uuid.uuid4().hex[:6]}",
        aliases=["llama3_8b_chat"],
        checkpoint_dir=checkpoint,
        cpus_per_replica=0.25,
    )
    home = tmp_path_factory.mktemp("deployer-home")
    url = f"sqlite:///{home / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=120),
        file_models=[spec],
        model_roots=ModelRoots(shared=()),
        engine_factory=partial(probe_engine, records.config(seconds_per_step=STEP_S)),
    )
    registry.start()
    try:
        yield spec
    finally:
        serve.delete(file_app_name(spec.name))
        database.dispose()


def chat(name: str, tokens: int, *, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "llama3_8b_chat",
        "dialog": {
            "message": {
                "role": "user",
                "content": f"id={name} tokens={tokens}",
                "tool_calls": [],
                "tool_responses": [],
            },
            "message_history": [],
        },
        "sampling_params": {"strategy": "greedy", "temperature": 0.0, "top_p": 0.95, "top_k": 0},
        "available_tools": [],
        "stream": stream,
        "max_tokens": 0,
        "logprobs": False,
    }


def openai_chat(name: str, tokens: int) -> dict[str, Any]:
    return {
        "model": "llama3_8b_chat",
        "messages": [{"role": "user", "content": f"id={name} tokens={tokens}"}],
        "stream": True,
    }


def read_events(response: httpx.Response, count: int) -> list[str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line)
            if len(events) == count:
                break
    return events


def assert_stopped_and_free(records: Records, name: str, base_url: str, next_name: str) -> None:
    """The replica closed the engine's stream early, and serves the next request at
    once (it holds one replica and one engine lock: a stream still decoding would
    make the next request wait out its 30 s)."""
    wait_for(lambda: records.closed(name), f"the replica to close stream {name}", 20)
    generated = records.tokens(name)
    # `closed` is written after the last token, by the engine's own clean-up.
    assert 2 <= generated < LONG, generated
    started = time.monotonic()
    response = httpx.post(
        f"{base_url}/inference/chat_completion",
        json=chat(next_name, 3, stream=False),
        headers=KEY,
        timeout=PROMPT_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < PROMPT_TIMEOUT_S
    assert records.tokens(name) == generated  # nothing more was generated meanwhile


@pytest.fixture(scope="module")
def in_process_api(spec: ModelSpec, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app under uvicorn in a thread, on a socket bound here (port 0)."""
    home = tmp_path_factory.mktemp("api-home")
    url = f"sqlite:///{home / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=[spec],
        model_roots=ModelRoots(shared=()),
    )
    settings = Settings(home=home, api_keys="alpha:key-alpha")
    app = create_app(settings, database=database, models=registry)
    try:
        with live_server(app) as base_url:
            yield base_url
    finally:
        database.dispose()


@pytest.mark.parametrize("route", ["/inference/chat_completion", "/v1/chat/completions"])
def test_a_client_disconnect_stops_the_replica_and_frees_it(
    in_process_api: str, records: Records, route: str
) -> None:
    name = f"gone-{route.strip('/').replace('/', '-')}"
    body = chat(name, LONG) if route.startswith("/inference") else openai_chat(name, LONG)
    with (
        httpx.Client(base_url=in_process_api, headers=KEY, timeout=30) as client,
        client.stream("POST", route, json=body) as response,
    ):
        assert response.status_code == 200
        assert len(read_events(response, 2)) == 2
        disconnected = time.monotonic()
    # Leaving the blocks closed the connection mid-stream.
    assert_stopped_and_free(records, name, in_process_api, f"after-{name}")
    print(f"{route}: replica closed the stream {time.monotonic() - disconnected:.2f} s after")


def _announced_port(process: subprocess.Popen[bytes], timeout_s: float) -> int:
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = process.stdout.readline().decode()
            if line.startswith("PORT "):
                return int(line.split()[1])
            assert line, f"the API process exited ({process.poll()}) before it listened"
    raise AssertionError(f"the API process announced no port within {timeout_s} s")


@pytest.fixture
def api_process(
    spec: ModelSpec, ray_cluster: Any, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    address = ray_cluster.address_info["gcs_address"]
    with (tmp_path / "api.log").open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(API_SCRIPT),
                address,
                str(tmp_path / "home"),
                spec.model_dump_json(),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)},
        )
    try:
        base_url = f"http://127.0.0.1:{_announced_port(process, 120)}"
        wait_for(lambda: _healthy(base_url), "the API process to answer", 60)
        yield process, base_url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        assert process.stdout is not None
        process.stdout.close()


def _healthy(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_api_process_dying_stops_the_replica_and_frees_it(
    api_process: tuple[subprocess.Popen[bytes], str], in_process_api: str, records: Records
) -> None:
    process, base_url = api_process
    name = "killed-api"
    client = httpx.Client(base_url=base_url, headers=KEY, timeout=30)
    with client.stream("POST", "/inference/chat_completion", json=chat(name, LONG)) as response:
        assert response.status_code == 200
        assert len(read_events(response, 2)) == 2
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        killed = time.monotonic()
        assert records.tokens(name) < LONG
    client.close()
    # Another API process (this one) serves the next request on the same replica.
    assert_stopped_and_free(records, name, in_process_api, "after-killed-api")
    print(f"replica closed the stream {time.monotonic() - killed:.2f} s after the SIGKILL")


def test_records_count_every_token(in_process_api: str, records: Records) -> None:
    """The probe's records are what the tests above rely on: a finished stream has all
    of its tokens and is closed."""
    response = httpx.post(
        f"{in_process_api}/inference/chat_completion",
        json=chat("whole", 5),
        headers=KEY,
        timeout=30,
    )
    assert response.status_code == 200
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line]
    assert events[-1]["stop_reason"] == "finished_ok"
    assert records.closed("whole") and records.tokens("whole") == 5
