"""OpenAI-compatible inference: OpenAI requests become the same Llama 3.1 prompts and
Serve handle calls as the spec's endpoints, and the results come back in OpenAI's shapes
(usage, finish reasons, `tool_calls` with JSON-encoded arguments).

Stop strings are applied here, on the generated text: the engine stops at its own stop
tokens only, and a stream is ended (its generation cancelled) at the first stop string.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Protocol, TypeVar, runtime_checkable

from pydantic import ValidationError

from corral.api.common import Message, ToolCall, ToolDefinition
from corral.api.openai import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionCreate,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionCreate,
    CompletionLogprobs,
    FinishReason,
    Model,
    ModelList,
    ResponseFunctionCall,
    ResponseToolCall,
    SamplingFields,
    Tool,
    ToolCallDelta,
    Usage,
)
from corral.errors import InvalidRequest, NotFound
from corral.llama3 import (
    ToolCallStreamDetector,
    format_chat,
    format_completion,
    parse_assistant_output,
)
from corral.services.inference import ModelRouter
from corral.services.model_calls import check_batch_size, generate, generate_each, stream_generation
from corral.serving.catalog import ServedName
from serve_apps.engines.protocol import (
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    StopReason,
    TokenDelta,
)

T = TypeVar("T")

# Owner shown in `/v1/models` for a shared model; a tenant's own model shows the tenant.
# `created` is 0: Corral does not know when a checkpoint was made, and a made-up time
# would be worse than none.
OWNER = "corral"
_FINISH_REASONS: dict[str, FinishReason] = {
    StopReason.END_OF_TURN: "stop",
    StopReason.END_OF_MESSAGE: "stop",
    StopReason.OUT_OF_TOKENS: "length",
}


@runtime_checkable
class ModelNames(Protocol):
    """Lists the model names a tenant can use (the same names `handle_for` accepts), each
    once; `ModelService` implements it."""

    def model_names(self, *, tenant: str) -> list[ServedName]: ...


# --- stop strings -------------------------------------------------------------------


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return (text[: min(found)], True) if found else (text, False)


class StopScanner:
    """Stop strings over a stream: text that might be the start of a stop string is held
    back until the next delta settles it, so nothing past a stop is ever released."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The text that may be sent now; sets `stopped` once a stop string is seen."""
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(self._held + delta, self._stops)
        if self.stopped:
            self._held = ""
            return text
        keep = max((_overlap(text, stop) for stop in self._stops), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What is still held when the stream ends without a stop string."""
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """The length of the longest end of `text` that begins `stop` (shorter than it)."""
    for length in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


# --- requests in ---------------------------------------------------------------------


def sampling_options(
    request: SamplingFields, *, max_tokens: int | None, logprobs: bool
) -> SamplingOptions:
    """OpenAI's sampling: temperature 1 and top_p 1 unless given; temperature 0 (or
    top_p 0) is greedy."""
    temperature = 1.0 if request.temperature is None else request.temperature
    top_p = 1.0 if request.top_p is None else request.top_p
    greedy = temperature == 0.0 or top_p == 0.0
    return SamplingOptions(
        max_tokens=max_tokens or 0,
        strategy="greedy" if greedy else "top_p",
        temperature=0.0 if greedy else temperature,
        top_p=1.0 if greedy else top_p,
        seed=request.seed,
        logprobs=logprobs,
    )


def spec_tools(tools: Sequence[Tool] | None) -> list[ToolDefinition]:
    """OpenAI functions as custom tools. The function's JSON schema is the tool's
    parameters, as the Llama 3.1 prompt shows them; its description goes into the schema,
    the one place that prompt has for it."""
    definitions = []
    for tool in tools or ():
        function = tool.function
        schema = dict(function.parameters or {})
        if function.description and "description" not in schema:
            schema = {"description": function.description, **schema}
        definitions.append(
            ToolDefinition(
                tool_name=function.name,
                parameters=schema or None,
                input_shields=[],
                output_shields=[],
            )
        )
    return definitions


def spec_messages(messages: Sequence[ChatMessage]) -> list[Message]:
    """OpenAI messages as spec messages: text only; a tool result is a `tool` turn."""
    return [
        Message(
            role="system" if message.role == "developer" else message.role,
            content=message.text,
            tool_calls=[
                _spec_tool_call(call.function.name, call.function.arguments)
                for call in message.tool_calls or ()
            ],
            tool_responses=[],
        )
        for message in messages
    ]


def _spec_tool_call(name: str, arguments: str) -> ToolCall:
    try:
        parsed = json.loads(arguments)
    except ValueError:
        raise InvalidRequest(f"the arguments of tool call {name!r} are not JSON") from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(f"the arguments of tool call {name!r} must be a JSON object")
    try:
        return ToolCall(tool_name=name, arguments=parsed)
    except ValidationError as exc:
        raise InvalidRequest(f"the arguments of tool call {name!r}: {exc}") from None


# --- results out ---------------------------------------------------------------------


def finish_reason(stop_reason: str) -> FinishReason:
    return _FINISH_REASONS[stop_reason]


def response_tool_calls(calls: Sequence[ToolCall]) -> list[ResponseToolCall]:
    return [
        ResponseToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            function=ResponseFunctionCall(
                name=call.tool_name, arguments=json.dumps(call.arguments, ensure_ascii=False)
            ),
        )
        for call in calls
    ]


def _completion_logprobs(result: GenerationResult) -> CompletionLogprobs | None:
    if result.logprobs is None:
        return None
    return CompletionLogprobs(token_logprobs=list(result.logprobs))


def _token_logprobs(delta: TokenDelta) -> CompletionLogprobs | None:
    if delta.logprob is None:
        return None
    return CompletionLogprobs(tokens=[delta.text], token_logprobs=[delta.logprob])


class OpenAIService:
    """Serves the OpenAI-compatible API through the same model router as the spec's
    inference API. Without `names`, `/v1/models` lists nothing."""

    def __init__(self, *, router: ModelRouter, names: ModelNames | None = None) -> None:
        self._router = router
        self._names = names

    # --- models ---------------------------------------------------------------------

    def models(self, *, tenant: str) -> ModelList:
        """The models a tenant can call here: LLMs only (a reward model answers no
        completion; it is scored through the spec's /reward_scoring/score)."""
        names = self._names.model_names(tenant=tenant) if self._names is not None else []
        return ModelList(
            data=[
                Model(id=n.name, created=0, owned_by=n.owner or OWNER)
                for n in names
                if n.kind == "llm"
            ]
        )

    def model(self, *, tenant: str, model: str) -> Model:
        for listed in self.models(tenant=tenant).data:
            if listed.id == model:
                return listed
        raise NotFound(f"no model {model!r}")

    # --- completions ----------------------------------------------------------------

    def _completion_requests(self, request: CompletionCreate) -> list[GenerationRequest]:
        sampling = sampling_options(
            request, max_tokens=request.max_tokens, logprobs=request.logprobs is not None
        )
        return [
            GenerationRequest(prompt=format_completion(prompt), sampling=sampling)
            for prompt in request.prompts
        ]

    async def completion(self, *, tenant: str, request: CompletionCreate) -> Completion:
        """One choice per prompt; the prompts go together so the replicas batch them."""
        check_batch_size(len(request.prompts), "prompts")
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        results = await generate_each(handle, self._completion_requests(request))
        choices = []
        for index, result in enumerate(results):
            text, stopped = cut_at_stop(result.text, request.stop_strings)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=_completion_logprobs(result),
                    finish_reason="stop" if stopped else finish_reason(result.stop_reason),
                )
            )
        return Completion(
            id=_id("cmpl"),
            created=int(time.time()),
            model=request.model,
            choices=choices,
            usage=Usage.of(
                prompt_tokens=sum(r.prompt_tokens for r in results),
                completion_tokens=sum(len(r.token_ids) for r in results),
            ),
        )

    async def completion_stream(
        self, *, tenant: str, request: CompletionCreate
    ) -> AsyncGenerator[Completion, None]:
        """A chunk per token; several prompts are streamed one after another, each
        chunk naming its prompt's `index`."""
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        completion_id, created = _id("cmpl"), int(time.time())
        usage = [0, 0]

        def chunk(
            index: int,
            text: str,
            finish: FinishReason | None = None,
            logprobs: CompletionLogprobs | None = None,
        ) -> Completion:
            choice = CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=finish
            )
            return Completion(
                id=completion_id, created=created, model=request.model, choices=[choice]
            )

        for index, generation in enumerate(self._completion_requests(request)):
            scanner = StopScanner(request.stop_strings)
            result: GenerationResult | None = None
            async with aclosing(stream_generation(handle, generation)) as items:
                async for item in items:
                    if isinstance(item, GenerationResult):
                        result = item
                    elif not scanner.stopped:
                        text = scanner.feed(item.text)
                        logprobs = _token_logprobs(item)
                        if text or logprobs is not None:
                            yield chunk(index, text, logprobs=logprobs)
                        if scanner.stopped and not request.include_usage:
                            break  # cancels the generation; usage would need its end
            if scanner.stopped:
                yield chunk(index, "", "stop")
            else:
                assert result is not None
                yield chunk(index, scanner.flush(), finish_reason(result.stop_reason))
            if result is not None:
                usage[0] += result.prompt_tokens
                usage[1] += len(result.token_ids)
        if request.include_usage:
            yield Completion(
                id=completion_id,
                created=created,
                model=request.model,
                choices=[],
                usage=Usage.of(prompt_tokens=usage[0], completion_tokens=usage[1]),
            )

    # --- chat completions -----------------------------------------------------------

    def _chat_request(
        self, request: ChatCompletionCreate
    ) -> tuple[GenerationRequest, list[ToolDefinition]]:
        tools = [] if request.tool_choice == "none" else spec_tools(request.tools)
        prompt = format_chat(spec_messages(request.messages), tools=tools)
        sampling = sampling_options(request, max_tokens=request.token_limit, logprobs=False)
        return GenerationRequest(prompt=prompt, sampling=sampling), tools

    async def chat_completion(
        self, *, tenant: str, request: ChatCompletionCreate
    ) -> ChatCompletion:
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        generation, tools = self._chat_request(request)
        result = await generate(handle, generation)
        text, stopped = cut_at_stop(result.text, request.stop_strings)
        stop_reason = StopReason.END_OF_TURN if stopped else result.stop_reason
        parsed = parse_assistant_output(text, stop_reason=stop_reason, tools=tools)
        finish: FinishReason = "tool_calls" if parsed.tool_calls else finish_reason(stop_reason)
        message = AssistantMessage(
            content=parsed.content if parsed.content or not parsed.tool_calls else None,
            tool_calls=response_tool_calls(parsed.tool_calls) or None,
        )
        return ChatCompletion(
            id=_id("chatcmpl"),
            created=int(time.time()),
            model=request.model,
            choices=[ChatChoice(index=0, message=message, finish_reason=finish)],
            usage=Usage.of(
                prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)
            ),
        )

    async def chat_completion_stream(
        self, *, tenant: str, request: ChatCompletionCreate
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """The role first, then text deltas as they come. A reply that looks like a tool
        call is held back and sent whole, as one `tool_calls` delta, at the end."""
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        generation, tools = self._chat_request(request)
        chunk_id, created = _id("chatcmpl"), int(time.time())

        def chunk(delta: ChatDelta, finish: FinishReason | None = None) -> ChatCompletionChunk:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            return ChatCompletionChunk(
                id=chunk_id, created=created, model=request.model, choices=[choice]
            )

        scanner = StopScanner(request.stop_strings)
        detector = ToolCallStreamDetector(tools)
        result: GenerationResult | None = None
        started = False
        async with aclosing(stream_generation(handle, generation)) as items:
            async for item in items:
                if not started:  # after the first engine item, so a refusal keeps its status
                    yield chunk(ChatDelta(role="assistant", content=""))
                    started = True
                if isinstance(item, GenerationResult):
                    result = item
                elif not scanner.stopped:
                    text = detector.feed(scanner.feed(item.text))
                    if text:
                        yield chunk(ChatDelta(content=text))
                    if scanner.stopped and not request.include_usage:
                        break  # cancels the generation; usage would need its end
        if scanner.stopped or result is None:
            stop_reason: str = StopReason.END_OF_TURN
        else:
            stop_reason = result.stop_reason
            text = detector.feed(scanner.flush())
            if text:
                yield chunk(ChatDelta(content=text))
        held = detector.finish(stop_reason=stop_reason)
        if held.content:
            yield chunk(ChatDelta(content=held.content))
        calls = response_tool_calls(held.tool_calls)
        if calls:
            deltas = [
                ToolCallDelta(index=i, id=call.id, function=call.function)
                for i, call in enumerate(calls)
            ]
            yield chunk(ChatDelta(tool_calls=deltas))
        finish: FinishReason = "tool_calls" if calls else finish_reason(stop_reason)
        yield chunk(ChatDelta(), finish)
        if request.include_usage and result is not None:
            yield ChatCompletionChunk(
                id=chunk_id,
                created=created,
                model=request.model,
                choices=[],
                usage=Usage.of(
                    prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)
                ),
            )


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
