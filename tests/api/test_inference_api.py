"""The spec's inference endpoints over HTTP against real Serve apps: the scripted engine
for exact text, tool calls, streaming and overload; the real engine on the demo model
for batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.serve.handle import DeploymentHandle

from corral.app import create_app
from corral.config import Settings
from corral.errors import NotFound
from corral.services.model_calls import MAX_BATCH_ITEMS
from corral.store.db import Database
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.llm import build_app
from tests.serve_apps.probe_engine import Records, probe_engine, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLAIN = "Paris is the capital of France."
TOOL = '<|python_tag|>brave_search.call(query="weather in Paris")'


class StaticRouter:
    """Routes model names to fixed handles (the registry is tested on its own)."""

    def __init__(self, handles: dict[str, DeploymentHandle[Any]]) -> None:
        self.handles = handles

    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> DeploymentHandle[Any]:
        if model not in self.handles:
            raise NotFound(f"no model {model!r}")
        return self.handles[model]


def _scripted(
    name: str, reply: str, *, seconds_per_step: float = 0.0, **overrides: Any
) -> DeploymentHandle[Any]:
    config = {"name": name, "model_dir": "/unused", "cpus_per_replica": 0.25} | overrides
    engine = partial(scripted_engine, ScriptedEngineConfig(reply, seconds_per_step))
    return serve.run(
        build_app(config, engine_factory=engine), name=f"llm-{name}", route_prefix=None
    )


@pytest.fixture(scope="module")
def handles(
    serve_instance: None, demo_model_dir: Path
) -> Iterator[dict[str, DeploymentHandle[Any]]]:
    handles = {
        "llama3_8b_chat": _scripted("api-plain", PLAIN),
        "llama3_70b_chat": _scripted("api-tool", TOOL),
        "llama3_8b": serve.run(
            build_app(
                {
                    "name": "api-demo",
                    "model_dir": str(demo_model_dir),
                    "cpus_per_replica": 0.25,
                    "max_batch_size": 8,
                    "batch_wait_timeout_s": 0.1,
                }
            ),
            name="llm-api-demo",
            route_prefix=None,
        ),
    }
    yield handles
    for name in ("api-plain", "api-tool", "api-demo"):
        serve.delete(f"llm-{name}")


@pytest.fixture
def client(
    tmp_path: Path, sqlite_database: Database, handles: dict[str, DeploymentHandle[Any]]
) -> Iterator[TestClient]:
    app = create_app(
        Settings(home=tmp_path), database=sqlite_database, model_router=StaticRouter(handles)
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


SAMPLING = {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0}


def _message(text: str, role: str = "user") -> dict[str, Any]:
    return {"role": role, "content": text, "tool_calls": [], "tool_responses": []}


def chat(model: str = "llama3_8b_chat", *, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "dialog": {"message": _message("What is the capital of France?"), "message_history": []},
        "sampling_params": SAMPLING,
        "available_tools": [],
        "max_tokens": 0,
        "stream": stream,
        "logprobs": False,
    } | extra


def events(body: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len("data: ") :])
        for line in body.split("\n\n")
        if line.startswith("data: ")
    ]


def test_chat_completion(client: TestClient) -> None:
    response = client.post("/inference/chat_completion", json=chat())
    assert response.status_code == 200, response.text
    assert response.json() == {"content": PLAIN, "tool_calls": [], "stop_reason": "finished_ok"}


def test_chat_completion_streams_token_by_token(client: TestClient) -> None:
    response = client.post("/inference/chat_completion", json=chat(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response.text)
    assert len(chunks) == len(PLAIN.split()) + 1
    assert "".join(c["text_delta"] for c in chunks) == PLAIN
    assert [c["stop_reason"] for c in chunks[:-1]] == ["not_stopped"] * (len(chunks) - 1)
    assert chunks[-1]["stop_reason"] == "finished_ok"


def test_generated_tokens_are_counted_by_serve_application(client: TestClient) -> None:
    """The count the engine returns, under the app's Serve name; a stream counts the same."""

    def tokens() -> float:
        text = client.get("/metrics").text  # no keys here: the local caller is an operator
        found = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "corral_generated_tokens_total"
            and sample.labels == {"application": "llm-api-plain"}
        ]
        return found[0] if found else 0.0

    assert client.post("/inference/chat_completion", json=chat()).status_code == 200
    once = tokens()
    assert once >= len(PLAIN.split())
    assert client.post("/inference/chat_completion", json=chat(stream=True)).status_code == 200
    assert tokens() == 2 * once


def test_tool_calls_are_parsed(client: TestClient) -> None:
    tools = [{"tool_name": "web_search", "input_shields": [], "output_shields": []}]
    body = client.post(
        "/inference/chat_completion", json=chat("llama3_70b_chat", available_tools=tools)
    ).json()
    assert body["tool_calls"] == [
        {"tool_name": "web_search", "arguments": {"query": "weather in Paris"}}
    ]
    assert body["content"] == ""
    streamed = events(
        client.post(
            "/inference/chat_completion",
            json=chat("llama3_70b_chat", stream=True, available_tools=tools),
        ).text
    )
    assert [c["text_delta"] for c in streamed[:-1]] == []
    assert streamed[-1]["tool_call"] == body["tool_calls"][0]
    assert streamed[-1]["stop_reason"] == "finished_ok"


def test_completion_and_max_tokens(client: TestClient) -> None:
    body = {
        "content": "Once upon a time",
        "model": "llama3_8b",
        "sampling_params": SAMPLING,
        "max_tokens": 3,
        "stream": False,
        "logprobs": True,
    }
    response = client.post("/inference/completion", json=body).json()
    assert response["stop_reason"] == "max_tokens"
    assert len(response["logprobs"]["token_logprobs"]) == 3
    streamed = events(client.post("/inference/completion", json=body | {"stream": True}).text)
    assert "".join(c["text_delta"] for c in streamed) == response["content"]
    assert streamed[-1]["stop_reason"] == "max_tokens"


def test_batch_completion_keeps_input_order(
    client: TestClient, handles: dict[str, DeploymentHandle[Any]]
) -> None:
    prompts = ["The sky is", "Rivers flow to the", "One, two,", "A cat sat on"]
    singles = []
    for prompt in prompts:
        one = {
            "content": prompt,
            "model": "llama3_8b",
            "sampling_params": SAMPLING,
            "max_tokens": 6,
            "stream": False,
            "logprobs": False,
        }
        singles.append(client.post("/inference/completion", json=one).json())
    response = client.post(
        "/inference/batch_completion",
        json={
            "model": "llama3_8b",
            "content_batch": prompts,
            "sampling_params": SAMPLING,
            "max_tokens": 6,
            "logprobs": False,
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jsonl")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines == singles
    assert len({line["content"] for line in lines}) > 1  # different prompts, different text
    sizes = handles["llama3_8b"].stats.remote().result()["batch_sizes"]
    assert max(sizes) > 1, f"the batch endpoint's requests never shared a batch: {sizes}"


def test_batch_chat_completion(client: TestClient) -> None:
    dialog = {"message": _message("hi"), "message_history": []}
    response = client.post(
        "/inference/batch_chat_completion",
        json={
            "model": "llama3_8b_chat",
            "batch_dialogs": [dialog, dialog, dialog],
            "sampling_params": SAMPLING,
            "available_tools": [],
            "max_tokens": 0,
            "logprobs": False,
        },
    )
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["content"] for line in lines] == [PLAIN] * 3


def test_a_batch_larger_than_the_models_queue_is_answered_and_past_the_cap_refused(
    client: TestClient,
) -> None:
    """300 dialogs are more than the app admits at once (a batch of 8 plus 64 queued on
    the replica, 64 more in the router): the API keeps at most CALLS_IN_FLIGHT of them on
    the model, so the batch is answered, not refused as overload. Past MAX_BATCH_ITEMS
    the request is refused at once with 422."""
    dialog = {"message": _message("hi"), "message_history": []}
    body = {
        "model": "llama3_8b_chat",
        "sampling_params": SAMPLING,
        "available_tools": [],
        "max_tokens": 0,
        "logprobs": False,
    }
    response = client.post(
        "/inference/batch_chat_completion", json=body | {"batch_dialogs": [dialog] * 300}
    )
    assert response.status_code == 200, response.text
    assert [json.loads(line)["content"] for line in response.text.splitlines()] == [PLAIN] * 300

    too_many = body | {"batch_dialogs": [dialog] * (MAX_BATCH_ITEMS + 1)}
    refused = client.post("/inference/batch_chat_completion", json=too_many)
    assert refused.status_code == 422, refused.text
    assert f"at most {MAX_BATCH_ITEMS} dialogs" in refused.json()["error"]["message"]
    prompts = {
        "model": "llama3_8b",
        "sampling_params": SAMPLING,
        "max_tokens": 1,
        "logprobs": False,
    }
    refused = client.post(
        "/inference/batch_completion",
        json=prompts | {"content_batch": ["x"] * (MAX_BATCH_ITEMS + 1)},
    )
    assert refused.status_code == 422, refused.text
    assert f"at most {MAX_BATCH_ITEMS} prompts" in refused.json()["error"]["message"]


def test_unknown_model_is_404_and_bad_parameters_422(client: TestClient) -> None:
    body = {
        "content": "x",
        "model": "llama3_70b",
        "sampling_params": SAMPLING,
        "max_tokens": 3,
        "stream": False,
        "logprobs": False,
    }
    assert client.post("/inference/completion", json=body).status_code == 404
    assert client.post("/inference/completion", json=body | {"stream": True}).status_code == 404
    bad = chat(sampling_params=SAMPLING | {"top_p": 1.5})
    assert client.post("/inference/chat_completion", json=bad).status_code == 422
    assert client.post("/inference/chat_completion", json=chat(model="gpt-4")).status_code == 422


def test_a_flood_past_the_queue_bound_is_refused_at_once_with_retry_after(
    serve_instance: None, tmp_path: Path, sqlite_database: Database
) -> None:
    """16 requests at a replica that holds 2 decoding + 2 queued, with 2 more allowed to
    wait in the router: the accepted ones are held inside the engine until the test
    releases them, so every refusal that arrives before that was answered without
    waiting for the queue (fast by construction, no clock involved); then every
    accepted request is answered, and nothing hangs."""
    records = Records(tmp_path / "records")
    config = {
        "name": "api-flood",
        "model_dir": "/unused",
        "cpus_per_replica": 0.25,
        "max_batch_size": 2,
        "max_queued_requests": 2,
        "target_ongoing_requests": 1,
    }
    engine = partial(probe_engine, records.config(reply=PLAIN))
    handle = serve.run(
        build_app(config, engine_factory=engine), name="llm-api-flood", route_prefix=None
    )
    app = create_app(
        Settings(home=tmp_path),
        database=sqlite_database,
        model_router=StaticRouter({"llama3_8b_chat": handle}),
    )
    accepted_at_most = 2 + 2 + 2
    flood = 16
    try:
        with (
            TestClient(app, raise_server_exceptions=False) as client,
            ThreadPoolExecutor(flood) as pool,
        ):
            held = _message("id=flood hold tokens=3")
            body = chat(dialog={"message": held, "message_history": []})
            responses = [
                pool.submit(client.post, "/inference/chat_completion", json=body)
                for _ in range(flood)
            ]
            try:
                wait_for(
                    lambda: sum(r.done() for r in responses) >= flood - accepted_at_most,
                    "the requests past the bound to be refused while the others are held",
                )
            except AssertionError as timed_out:
                answered_so_far = [r.result().status_code for r in responses if r.done()]
                raise AssertionError(
                    f"{timed_out}; answered so far: {answered_so_far}, "
                    f"the engine started one: {records.started('flood')}"
                ) from None
            refused = [r.result() for r in responses if r.done()]
            assert records.started("flood") and not records.closed("flood")
            records.release()
            answered = [r.result(timeout=60) for r in responses if r not in refused]
        assert refused and all(r.status_code == 503 for r in refused), refused
        assert {r.headers["retry-after"] for r in refused} == {"1"}
        assert {r.json()["error"]["code"] for r in refused} == {"overloaded"}
        statuses = sorted(r.result().status_code for r in responses)
        assert 200 in statuses and set(statuses) <= {200, 503}, statuses
        assert {r.json()["content"] for r in answered if r.status_code == 200} == {"Paris is the"}
    finally:
        records.release()
        serve.delete("llm-api-flood")


def test_a_prompt_too_long_fails_alone(client: TestClient) -> None:
    """One over-long prompt in a batch is refused with 422; a good request sent at the
    same time still succeeds."""
    too_long = {
        "content": "word " * 2000,
        "model": "llama3_8b",
        "sampling_params": SAMPLING,
        "max_tokens": 4,
        "stream": False,
        "logprobs": False,
    }
    fine = too_long | {"content": "The sky is"}
    with ThreadPoolExecutor(2) as pool:
        bad, good = pool.map(
            lambda b: client.post("/inference/completion", json=b), [too_long, fine]
        )
    assert bad.status_code == 422, bad.text
    assert "context window" in bad.json()["error"]["message"]
    assert good.status_code == 200
