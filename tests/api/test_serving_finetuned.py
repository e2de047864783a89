"""Serving fine-tuned weights end to end: a LoRA adapter over the demo model, registered
through the models API under a spec model name, answers the spec's chat endpoint with
the real engine, differently from its base."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.demo_model import build_demo_model
from corral.services.models import build_model_service
from corral.serving.catalog import model_roots
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.tenancy import job_checkpoint_dir
from tests.conftest import make_lora_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = {"Authorization": "Bearer key-ft"}


@pytest.fixture
def client(serve_instance: None, tmp_path: Path, sqlite_database: Database) -> Iterator[TestClient]:
    home = tmp_path / "home"
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[],
        model_roots=model_roots(Settings(home=home)),
    )
    registry.start()
    app = create_app(
        Settings(home=home, api_keys="ft:key-ft"), database=sqlite_database, models=registry
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    for name in list(serve.status().applications):
        if name.startswith("llm-") and "@" in name:
            serve.delete(name)


def _chat(model: str) -> dict[str, object]:
    return {
        "model": model,
        "dialog": {
            "message": {
                "role": "user",
                "content": "Name a river.",
                "tool_calls": [],
                "tool_responses": [],
            },
            "message_history": [],
        },
        "sampling_params": {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0},
        "available_tools": [],
        "max_tokens": 8,
        "stream": False,
        "logprobs": False,
    }


def test_a_registered_lora_adapter_answers_under_a_spec_name(
    client: TestClient, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    base = build_demo_model(home / "models" / "base")
    adapter = make_lora_adapter(
        base, job_checkpoint_dir(home / "checkpoints", "ft", "job-7") / "lora"
    )

    # Before registration the tenant has no model under the spec's name.
    assert (
        client.post(
            "/inference/chat_completion", json=_chat("llama3_8b_chat"), headers=KEY
        ).status_code
        == 404
    )
    for name, extra in (("llama3_70b_chat", {}), ("llama3_8b_chat", {"adapter_dir": str(adapter)})):
        response = client.post(
            "/models/register",
            json={"name": name, "checkpoint_dir": str(base), "max_batch_size": 4} | extra,
            headers=KEY,
        )
        assert response.status_code == 200, response.text

    listed = {m["name"]: m for m in client.get("/models", headers=KEY).json()["data"]}
    assert listed["llama3_8b_chat"]["adapter_dir"] == str(adapter)
    assert listed["llama3_8b_chat"]["source"] == "registered"

    tuned = client.post("/inference/chat_completion", json=_chat("llama3_8b_chat"), headers=KEY)
    plain = client.post("/inference/chat_completion", json=_chat("llama3_70b_chat"), headers=KEY)
    assert tuned.status_code == plain.status_code == 200
    assert tuned.json()["content"] != plain.json()["content"]
    # Greedy decoding of the same weights is repeatable.
    again = client.post("/inference/chat_completion", json=_chat("llama3_8b_chat"), headers=KEY)
    assert again.json()["content"] == tuned.json()["content"]


def test_register_refuses_directories_outside_the_model_roots(client: TestClient) -> None:
    response = client.post(
        "/models/register",
        json={"name": "escape", "checkpoint_dir": "/etc"},
        headers=KEY,
    )
    assert response.status_code == 422
    assert [m["name"] for m in client.get("/models", headers=KEY).json()["data"]] == []
