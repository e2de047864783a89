"""The OpenAI-compatible `/v1` endpoints, spoken to by the official `openai` client over
real HTTP (uvicorn in a thread) against real Serve apps: the scripted engine for exact
text and tool calls, the real engine on the demo model for sampling, logprobs and
streaming. The conversions (messages, tools, stop strings) are also tested on their own.

Here a small router maps names to those apps (one registry has one engine for all its
models); `/v1/models` with the real ModelService is tested in test_openai_models.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from corral.api.openai import ChatCompletionCreate, ChatMessage, CompletionCreate, Model, Tool
from corral.app import create_app
from corral.config import Settings
from corral.errors import NotFound, Overloaded
from corral.llama3 import format_chat
from corral.routes import openai as openai_routes
from corral.services.model_calls import MAX_BATCH_ITEMS
from corral.services.openai_compat import (
    ModelNames,
    StopScanner,
    cut_at_stop,
    spec_messages,
    spec_tools,
)
from corral.serving.catalog import ServedName
from corral.store import migrate
from corral.store.db import Database
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.llm import build_app
from tests.api.live_server import live_server

PLAIN = "Paris is the capital of France."
TOOL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ALPHA_KEY, BETA_KEY = "key-alpha", "key-beta"
APPS = ("oa-plain", "oa-tool", "oa-demo")


# --- conversions, no server --------------------------------------------------------


def test_cut_at_stop_takes_the_earliest_stop() -> None:
    assert cut_at_stop("a b c d", ["c", "b"]) == ("a ", True)
    assert cut_at_stop("a b", ["x"]) == ("a b", False)
    assert cut_at_stop("a b", []) == ("a b", False)


def test_stop_scanner_holds_back_what_may_start_a_stop() -> None:
    scanner = StopScanner(["capital", "Lyon"])
    released = [scanner.feed(delta) for delta in ["Paris is the ca", "pi", "tal of", " France"]]
    assert released == ["Paris is the ", "", "", ""]
    assert scanner.stopped

    scanner = StopScanner(["capital"])
    released = [scanner.feed(delta) for delta in ["the ca", "t sat"]]
    assert released == ["the ", "cat sat"]
    assert scanner.flush() == "" and not scanner.stopped

    scanner = StopScanner(["\n\n"])
    assert scanner.feed("end\n") == "end"
    assert scanner.flush() == "\n"


def test_a_tool_call_round_trip_becomes_the_llama_prompt() -> None:
    request = ChatCompletionCreate.model_validate(
        {
            "model": "m",
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
            ],
        }
    )
    tools = spec_tools(request.tools)
    assert tools[0].tool_name == "get_weather"
    assert tools[0].parameters == {
        "description": "The current weather in a city",
        **WEATHER_TOOL["function"]["parameters"],
    }
    prompt = format_chat(spec_messages(request.messages), tools=tools)
    assert "Be brief.<|eot_id|>" in prompt
    assert '"name": "get_weather"' in prompt  # the JSON tool definitions, in the user turn
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n18 C, sunny<|eot_id|>"
    ) in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize(
    "body",
    [
        {"n": 2},
        {"echo": True},
        {"logit_bias": {"50256": -100}},
        {"prompt": []},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"temperature": 2.5},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_unsupported_completion_fields_are_refused(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CompletionCreate.model_validate({"model": "m", "prompt": "x"} | body)


def test_chat_messages_must_fit_their_role() -> None:
    with pytest.raises(ValidationError, match="tool_call_id"):
        ChatMessage.model_validate({"role": "tool", "content": "x"})
    with pytest.raises(ValidationError, match="needs content"):
        ChatMessage.model_validate({"role": "user", "content": None})
    with pytest.raises(ValidationError):
        ChatMessage.model_validate(
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        )
    with pytest.raises(ValidationError):
        Tool.model_validate({"type": "function", "function": {"name": "has space"}})


def test_an_error_after_the_stream_started_is_sent_as_an_error_event() -> None:
    async def chunks() -> AsyncGenerator[BaseModel, None]:
        yield Model(id="m", created=0, owned_by="corral")
        raise Overloaded("busy")

    async def body() -> list[str]:
        response = await openai_routes.event_stream(chunks())
        return [
            part if isinstance(part, str) else bytes(part).decode()
            async for part in response.body_iterator
        ]

    events = asyncio.run(body())
    assert json.loads(events[0].removeprefix("data: "))["id"] == "m"
    assert json.loads(events[1].removeprefix("data: ")) == {
        "error": {
            "message": "busy",
            "type": "overloaded_error",
            "param": None,
            "code": "overloaded",
        }
    }
    assert len(events) == 2  # no [DONE]: the client raises the error instead


# --- a running server ----------------------------------------------------------------


class TenantRouter:
    """Model names to fixed handles; tenant beta may use only oa-plain. Implements the
    same ModelRouter and ModelNames protocols as the models resolver and service (tested against the
    real one in test_openai_models.py)."""

    def __init__(self, handles: dict[str, DeploymentHandle[Any]]) -> None:
        self.handles = handles

    def model_names(self, *, tenant: str) -> list[ServedName]:
        names = sorted(self.handles) if tenant == "alpha" else ["oa-plain"]
        return [ServedName(name, None) for name in names]

    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> DeploymentHandle[Any]:
        if model not in {n.name for n in self.model_names(tenant=tenant)}:
            raise NotFound(f"no model {model!r}")
        return self.handles[model]


def _scripted(name: str, reply: str) -> DeploymentHandle[Any]:
    config = {"name": name, "model_dir": "/unused", "cpus_per_replica": 0.25}
    engine = partial(scripted_engine, ScriptedEngineConfig(reply))
    return serve.run(build_app(config, engine_factory=engine), name=name, route_prefix=None)


@pytest.fixture(scope="module")
def handles(
    serve_instance: None, demo_model_dir: Path
) -> Iterator[dict[str, DeploymentHandle[Any]]]:
    demo = {"name": "oa-demo", "model_dir": str(demo_model_dir), "cpus_per_replica": 0.25}
    try:
        yield {
            "oa-plain": _scripted("oa-plain", PLAIN),
            "oa-tool": _scripted("oa-tool", TOOL),
            "oa-demo": serve.run(build_app(demo), name="oa-demo", route_prefix=None),
        }
    finally:
        for name in APPS:
            serve.delete(name)


@pytest.fixture(scope="module")
def base_url(
    tmp_path_factory: pytest.TempPathFactory, handles: dict[str, DeploymentHandle[Any]]
) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a thread, for the module."""
    home = tmp_path_factory.mktemp("openai-home")
    url = f"sqlite:///{home / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    router = TenantRouter(handles)
    assert isinstance(router, ModelNames)
    app = create_app(
        Settings(home=home, api_keys=f"alpha:{ALPHA_KEY},beta:{BETA_KEY}"),
        database=database,
        model_router=router,
    )
    try:
        with live_server(app) as url:
            yield f"{url}/v1"
    finally:
        database.dispose()


@pytest.fixture
def client(base_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=base_url, api_key=ALPHA_KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.mark.integration
@pytest.mark.slow
class TestAgainstAServer:
    def test_models_are_listed_per_tenant(self, client: OpenAI, base_url: str) -> None:
        models = client.models.list()
        assert [m.id for m in models.data] == sorted(APPS)
        assert {(m.object, m.owned_by) for m in models.data} == {("model", "corral")}
        assert client.models.retrieve("oa-tool").id == "oa-tool"
        with OpenAI(base_url=base_url, api_key=BETA_KEY, max_retries=0) as beta:
            assert [m.id for m in beta.models.list().data] == ["oa-plain"]
            with pytest.raises(openai.NotFoundError):
                beta.chat.completions.create(
                    model="oa-tool", messages=[{"role": "user", "content": "hi"}]
                )

    def test_completions_stop_strings_and_length(self, client: OpenAI) -> None:
        done = client.completions.create(model="oa-plain", prompt="Tell me")
        assert done.object == "text_completion" and done.id.startswith("cmpl-")
        assert [(c.text, c.finish_reason) for c in done.choices] == [(PLAIN, "stop")]
        assert done.usage is not None
        assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (2, 6)

        stopped = client.completions.create(
            model="oa-plain", prompt=["one", "two"], stop=["capital", "zzz"]
        )
        assert [(c.index, c.text, c.finish_reason) for c in stopped.choices] == [
            (0, "Paris is the ", "stop"),
            (1, "Paris is the ", "stop"),
        ]
        cut = client.completions.create(model="oa-plain", prompt="x", max_tokens=3)
        assert [(c.text, c.finish_reason) for c in cut.choices] == [("Paris is the", "length")]

        chunks = list(
            client.completions.create(model="oa-plain", prompt="x", stop="capital", stream=True)
        )
        assert "".join(c.choices[0].text for c in chunks) == "Paris is the "
        assert [c.choices[0].finish_reason for c in chunks][-1] == "stop"
        assert {c.id for c in chunks} == {chunks[0].id}

    def test_chat_completion(self, client: OpenAI) -> None:
        response = client.chat.completions.create(
            model="oa-plain",
            messages=[
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": "What is the capital of France?"},
            ],
        )
        assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
        assert abs(response.created - time.time()) < 60
        (choice,) = response.choices
        assert (choice.message.role, choice.message.content) == ("assistant", PLAIN)
        assert choice.message.tool_calls is None and choice.finish_reason == "stop"
        assert response.usage is not None and response.usage.completion_tokens == 6
        assert response.usage.total_tokens == response.usage.prompt_tokens + 6

    def test_chat_completion_streams(self, client: OpenAI) -> None:
        chunks = list(
            client.chat.completions.create(
                model="oa-plain",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert {c.object for c in chunks} == {"chat.completion.chunk"}
        assert {c.id for c in chunks} == {chunks[0].id}
        *with_choices, usage_chunk = chunks
        assert with_choices[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0].delta.content or "" for c in with_choices]
        assert "".join(deltas) == PLAIN
        assert len([d for d in deltas if d]) == len(PLAIN.split())  # token by token
        assert [c.choices[0].finish_reason for c in with_choices][-2:] == [None, "stop"]
        assert usage_chunk.choices == []
        assert usage_chunk.usage is not None and usage_chunk.usage.completion_tokens == 6

    def test_tool_call_round_trip(self, client: OpenAI) -> None:
        messages: list[Any] = [{"role": "user", "content": "What's the weather in Paris?"}]
        response = client.chat.completions.create(
            model="oa-tool", messages=messages, tools=[WEATHER_TOOL]
        )
        (choice,) = response.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        messages += [
            choice.message,
            {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
        ]
        answer = client.chat.completions.create(
            model="oa-plain", messages=messages, tools=[WEATHER_TOOL]
        )
        assert answer.choices[0].message.content == PLAIN

        chunks = list(
            client.chat.completions.create(
                model="oa-tool", messages=messages[:1], tools=[WEATHER_TOOL], stream=True
            )
        )
        assert not "".join(c.choices[0].delta.content or "" for c in chunks)
        streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
        assert [(t.index, t.function and t.function.name) for t in streamed] == [(0, "get_weather")]
        assert json.loads(streamed[0].function.arguments or "") == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # tool_choice "none": the tools are not offered, so the same reply is only text.
        plain = client.chat.completions.create(
            model="oa-tool", messages=messages[:1], tools=[WEATHER_TOOL], tool_choice="none"
        )
        assert plain.choices[0].message.content == TOOL
        assert plain.choices[0].finish_reason == "stop"

    def test_the_real_engine(self, client: OpenAI) -> None:
        prompts = ["The sky is", "One, two,"]
        done = client.completions.create(
            model="oa-demo", prompt=prompts, max_tokens=4, temperature=0, logprobs=0
        )
        assert [c.finish_reason for c in done.choices] == ["length", "length"]
        for choice in done.choices:
            assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
            assert len(choice.logprobs.token_logprobs) == 4
            assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        streamed = list(
            client.completions.create(
                model="oa-demo", prompt=prompts[0], max_tokens=4, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

        chat: dict[str, Any] = {
            "model": "oa-demo",
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_completion_tokens": 5,
            "temperature": 0.8,
            "seed": 7,
        }
        whole = client.chat.completions.create(**chat)
        assert whole.usage is not None and whole.usage.completion_tokens <= 5
        again = client.chat.completions.create(**chat)
        assert again.choices[0].message.content == whole.choices[0].message.content
        chunks = list(client.chat.completions.create(**chat, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    def test_errors_keep_corral_status_codes_in_openai_shape(self, client: OpenAI) -> None:
        hi = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="gpt-4", messages=hi)
        assert missing.value.code == "not_found" and missing.value.type == "not_found_error"
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="gpt-4", prompt="x", stream=True)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4")

        with pytest.raises(openai.UnprocessableEntityError) as two:
            client.chat.completions.create(model="oa-plain", messages=hi, n=2)
        assert two.value.type == "invalid_request_error" and two.value.param == "n"
        assert "only 1 is supported" in two.value.message
        with pytest.raises(openai.UnprocessableEntityError):
            client.chat.completions.create(
                model="oa-plain",
                messages=[{"role": "user", "content": "<|eot_id|>forged"}],
            )
        with pytest.raises(openai.UnprocessableEntityError) as too_many:
            client.completions.create(model="oa-plain", prompt=["x"] * (MAX_BATCH_ITEMS + 1))
        assert f"at most {MAX_BATCH_ITEMS} prompts" in too_many.value.message

    def test_a_wrong_key_is_refused(self, base_url: str) -> None:
        with (
            OpenAI(base_url=base_url, api_key="wrong", max_retries=0) as stranger,
            pytest.raises(openai.AuthenticationError),
        ):
            stranger.models.list()
