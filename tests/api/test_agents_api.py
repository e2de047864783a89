"""The agentic_system routes over HTTP against real Serve apps on the session cluster:
the scripted chat engine for exact multi-step flows (a server tool, a client tool), the
real engine on the demo model for one turn plain and streamed. Every response, and each
event of a stream, is validated against the OpenAPI document as it is read
(tests/api/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray import serve
from ray.serve.handle import DeploymentHandle

from corral.agents.events import Chunk, TurnAssembler
from corral.api.common import Message
from corral.app import create_app
from corral.config import Settings
from corral.store.db import Database
from serve_apps.engines.scripted import ScriptedChatConfig, scripted_chat_engine
from serve_apps.llm import build_app
from tests.agents.test_turn import RULES, FakeRetriever, RecordingTool, chunk
from tests.api.test_inference_api import StaticRouter
from tests.services.test_agents import OnlyLlamaGuard

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def handles(
    serve_instance: None, demo_model_dir: Path
) -> Iterator[dict[str, DeploymentHandle[Any]]]:
    engine = partial(scripted_chat_engine, ScriptedChatConfig(RULES))
    scripted = {"name": "agents-scripted", "model_dir": "/unused", "cpus_per_replica": 0.25}
    demo = {"name": "agents-demo", "model_dir": str(demo_model_dir), "cpus_per_replica": 0.25}
    handles = {
        "llama3_8b_chat": serve.run(
            build_app(scripted, engine_factory=engine),
            name="llm-agents-scripted",
            route_prefix=None,
        ),
        "llama3_70b_chat": serve.run(build_app(demo), name="llm-agents-demo", route_prefix=None),
    }
    yield handles
    for name in ("agents-scripted", "agents-demo"):
        serve.delete(f"llm-{name}")


@pytest.fixture
def math() -> RecordingTool:
    return RecordingTool("math")


@pytest.fixture
def client(
    tmp_path: Path,
    sqlite_database: Database,
    handles: dict[str, DeploymentHandle[Any]],
    math: RecordingTool,
) -> Iterator[TestClient]:
    retriever = FakeRetriever({"notes": [chunk("notes", "doc-1", "Paris is in France.", 0.8)]})
    app = create_app(
        Settings(home=tmp_path),
        database=sqlite_database,
        model_router=StaticRouter(handles),
        retriever=retriever,
        tools={"math": math},
        shields=OnlyLlamaGuard(),
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _message(text: str, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": text, "tool_calls": [], "tool_responses": []} | extra


def _tool(name: str) -> dict[str, Any]:
    return {"tool_name": name, "input_shields": [], "output_shields": []}


def create(client: TestClient, uuid: str, **changes: Any) -> Any:
    body = {
        "uuid": uuid,
        "instructions": "You are a helpful assistant.",
        "model": "llama3_8b_chat",
        "available_tools": [_tool("math"), _tool("get_weather")],
        "executable_tools": ["math"],
        "memory_bank_uuids": ["notes"],
        "input_shields": [{"shield_type": "llama_guard", "params": {}}],
        "output_shields": [],
    } | changes
    return client.post("/agentic_system/create", json=body)


def execute(
    client: TestClient,
    uuid: str,
    messages: list[dict[str, Any]],
    history: list[Any] | None = None,
    stream: bool = False,
) -> Any:
    body = {
        "agent_uuid": uuid,
        "messages": messages,
        "turn_history": history or [],
        "stream": stream,
    }
    return client.post("/agentic_system/execute", json=body)


def events(body: str) -> list[Chunk]:
    return [
        Chunk.model_validate(json.loads(line[len("data: ") :]))
        for line in body.split("\n\n")
        if line.startswith("data: ")
    ]


def rebuilt(chunks: list[Chunk], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The turn as a streaming client rebuilds it (docs/agents.md)."""
    assembler = TurnAssembler()
    for item in chunks:
        assembler.feed(item)
    turn = assembler.turn([Message.model_validate(m) for m in messages])
    return turn.model_dump(mode="json", exclude_none=True)


def _without_uuids(turn: dict[str, Any]) -> dict[str, Any]:
    return turn | {"steps": [{k: v for k, v in s.items() if k != "uuid"} for s in turn["steps"]]}


def test_a_turn_with_retrieval_and_a_server_tool_plain_and_streamed(
    client: TestClient, math: RecordingTool
) -> None:
    assert create(client, "helper").json() == {"agent_uuid": "helper"}
    asked = [_message("what is 6 times 7?")]
    response = execute(client, "helper", asked)
    assert response.status_code == 200, response.text
    turn = response.json()["turn"]
    assert [s["step_type"] for s in turn["steps"]] == [
        "safety_filtering",
        "memory_retrieval",
        "model_inference",
        "tool_execution",
        "model_inference",
    ]
    assert turn["steps"][1]["documents"][0]["metadata"]["document_uuid"] == "doc-1"
    assert turn["steps"][1]["scores"] == [0.8]
    assert turn["steps"][3]["tool_responses"] == [{"tool_name": "math", "content": "42"}]
    assert turn["response_message"]["content"] == "The answer is 42."
    assert len(math.calls) == 1

    streamed = execute(client, "helper", asked, stream=True)
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed.text)
    assert chunks[-1].stop_reason == "finished_ok"
    assert all(c.stop_reason is None for c in chunks[:-1])
    assert _without_uuids(rebuilt(chunks, asked)) == _without_uuids(turn)


def test_a_client_tool_comes_back_and_the_client_continues_the_turn(client: TestClient) -> None:
    assert create(client, "weather", memory_bank_uuids=[], input_shields=[]).status_code == 200
    first = execute(client, "weather", [_message("what is the weather in Paris?")]).json()["turn"]
    call = {"tool_name": "get_weather", "arguments": {"city": "Paris"}}
    assert first["response_message"]["tool_calls"] == [call]
    result = _message(
        "", "tool", tool_responses=[{"tool_name": "get_weather", "content": "sunny, 24 C"}]
    )
    second = execute(client, "weather", [result], history=[first])
    assert second.status_code == 200, second.text
    assert second.json()["turn"]["response_message"]["content"] == "It is sunny in Paris."


def test_create_conflicts_refusals_and_delete(client: TestClient) -> None:
    assert create(client, "a1", memory_bank_uuids=[]).status_code == 200
    assert create(client, "a1", memory_bank_uuids=[]).status_code == 200
    assert create(client, "a1", memory_bank_uuids=[], instructions="other").status_code == 409
    refused = create(client, "a2", output_shields=[{"shield_type": "prompt_guard", "params": {}}])
    assert refused.status_code == 422 and "prompt_guard" in refused.text
    assert create(client, "a3", memory_bank_uuids=["missing"]).status_code == 422
    assert execute(client, "nobody", [_message("hi")]).status_code == 404
    assert execute(client, "nobody", [_message("hi")], stream=True).status_code == 404
    assert client.delete("/agentic_system/delete", params={"agent_id": "a1"}).status_code == 200
    assert client.delete("/agentic_system/delete", params={"agent_id": "a1"}).status_code == 404
    assert execute(client, "a1", [_message("hi")]).status_code == 404


def test_a_turn_on_the_real_demo_model_plain_and_streamed(client: TestClient) -> None:
    plain = {
        "model": "llama3_70b_chat",
        "available_tools": [],
        "executable_tools": [],
        "memory_bank_uuids": [],
        "input_shields": [],
    }
    assert create(client, "demo", **plain).status_code == 200
    asked = [_message("Hello, who are you?")]
    response = execute(client, "demo", asked)
    assert response.status_code == 200, response.text
    turn = response.json()["turn"]
    assert [s["step_type"] for s in turn["steps"]] == ["model_inference"]
    assert turn["response_message"]["content"] == turn["steps"][0]["text"]

    streamed = execute(client, "demo", asked, stream=True)
    assert streamed.status_code == 200
    chunks = events(streamed.text)
    assert chunks[0].event_type == "step_start" and chunks[-1].event_type == "step_end"
    assert chunks[-1].stop_reason in ("finished_ok", "max_tokens")
    # Greedy decoding: the stream rebuilds the same turn.
    assert _without_uuids(rebuilt(chunks, asked)) == _without_uuids(turn)
