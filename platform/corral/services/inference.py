"""Inference: spec requests become Llama 3.1 prompts, go to the model's Serve app through
a handle, and come back as spec responses (tool calls parsed out of the text)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol, TypeVar

from ray.serve.handle import DeploymentHandle

from corral.api.common import Content, Dialog, Message, SamplingParams, ToolDefinition
from corral.api.inference import (
    BatchChatCompletionRequest,
    BatchCompletionRequest,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseStreamChunk,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseStreamChunk,
)
from corral.errors import CapabilityUnavailable
from corral.llama3 import (
    ToolCallStreamDetector,
    format_chat,
    format_completion,
    parse_assistant_output,
    to_spec_stop_reason,
)
from corral.services.model_calls import check_batch_size, generate, generate_each, stream_generation
from serve_apps.engines.protocol import (
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    TokenDelta,
)
from serve_apps.options import ModelKind

T = TypeVar("T")


class ModelRouter(Protocol):
    """Finds the Serve app that answers for a model name, for a tenant."""

    def handle_for(
        self, *, tenant: str, model: str, kind: ModelKind = "llm"
    ) -> DeploymentHandle[Any]:
        """Raises NotFound for a model the tenant cannot use, InvalidRequest for one that
        is not of `kind` (see `corral.serving.resolver`)."""
        ...


class NoModels:
    """The router of a server without a Ray connection: every model is unavailable."""

    def handle_for(
        self, *, tenant: str, model: str, kind: ModelKind = "llm"
    ) -> DeploymentHandle[Any]:
        capability = "reward_scoring" if kind == "reward" else "inference"
        raise CapabilityUnavailable(capability, "this server runs without a Ray connection")


def sampling_options(params: SamplingParams, *, max_tokens: int, logprobs: bool) -> SamplingOptions:
    return SamplingOptions(
        max_tokens=max_tokens,
        strategy=params.strategy,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        logprobs=logprobs,
    )


def _logprobs(result: GenerationResult) -> dict[str, Any] | None:
    if result.logprobs is None:
        return None
    return {"token_logprobs": list(result.logprobs)}


def _completion_response(result: GenerationResult) -> CompletionResponse:
    return CompletionResponse(
        content=result.text,
        stop_reason=to_spec_stop_reason(result.stop_reason),
        logprobs=_logprobs(result),
    )


def _dialog_messages(dialog: Dialog) -> list[Message]:
    return [*dialog.message_history, dialog.message]


class InferenceService:
    def __init__(self, *, router: ModelRouter) -> None:
        self._router = router

    # --- completion -----------------------------------------------------------------

    def _completion_request(
        self, content: Content, params: SamplingParams, *, max_tokens: int, logprobs: bool
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=format_completion(content),
            sampling=sampling_options(params, max_tokens=max_tokens, logprobs=logprobs),
        )

    async def completion(self, *, tenant: str, request: CompletionRequest) -> CompletionResponse:
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        result = await generate(
            handle,
            self._completion_request(
                request.content,
                request.sampling_params,
                max_tokens=request.max_tokens,
                logprobs=request.logprobs,
            ),
        )
        return _completion_response(result)

    async def completion_stream(
        self, *, tenant: str, request: CompletionRequest
    ) -> AsyncIterator[CompletionResponseStreamChunk]:
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        generation = self._completion_request(
            request.content,
            request.sampling_params,
            max_tokens=request.max_tokens,
            logprobs=request.logprobs,
        )
        async for item in stream_generation(handle, generation):
            if isinstance(item, TokenDelta):
                yield CompletionResponseStreamChunk(
                    text_delta=item.text,
                    stop_reason="not_stopped",
                    logprobs=None if item.logprob is None else {"token_logprob": item.logprob},
                )
            else:
                yield CompletionResponseStreamChunk(
                    text_delta="", stop_reason=to_spec_stop_reason(item.stop_reason)
                )

    async def batch_completion(
        self, *, tenant: str, request: BatchCompletionRequest
    ) -> list[CompletionResponse]:
        check_batch_size(len(request.content_batch), "prompts")
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        results = await generate_each(
            handle,
            [
                self._completion_request(
                    content,
                    request.sampling_params,
                    max_tokens=request.max_tokens,
                    logprobs=request.logprobs,
                )
                for content in request.content_batch
            ],
        )
        return [_completion_response(r) for r in results]

    # --- chat -----------------------------------------------------------------------

    def _chat_request(
        self,
        dialog: Dialog,
        tools: Sequence[ToolDefinition],
        params: SamplingParams,
        *,
        max_tokens: int,
        logprobs: bool,
    ) -> GenerationRequest:
        return GenerationRequest(
            prompt=format_chat(_dialog_messages(dialog), tools=tools),
            sampling=sampling_options(params, max_tokens=max_tokens, logprobs=logprobs),
        )

    @staticmethod
    def _chat_response(
        result: GenerationResult, tools: Sequence[ToolDefinition]
    ) -> ChatCompletionResponse:
        parsed = parse_assistant_output(result.text, stop_reason=result.stop_reason, tools=tools)
        return ChatCompletionResponse(
            content=parsed.content,
            tool_calls=parsed.tool_calls,
            stop_reason=to_spec_stop_reason(result.stop_reason),
            logprobs=_logprobs(result),
        )

    async def chat_completion(
        self, *, tenant: str, request: ChatCompletionRequest
    ) -> ChatCompletionResponse:
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        generation = self._chat_request(
            request.dialog,
            request.available_tools,
            request.sampling_params,
            max_tokens=request.max_tokens,
            logprobs=request.logprobs,
        )
        result = await generate(handle, generation)
        return self._chat_response(result, request.available_tools)

    async def chat_completion_stream(
        self, *, tenant: str, request: ChatCompletionRequest
    ) -> AsyncIterator[ChatCompletionResponseStreamChunk]:
        """Text deltas as they come; a reply that looks like a tool call is held back and
        sent as the final chunk's `tool_call` (with any content before it)."""
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        generation = self._chat_request(
            request.dialog,
            request.available_tools,
            request.sampling_params,
            max_tokens=request.max_tokens,
            logprobs=request.logprobs,
        )
        detector = ToolCallStreamDetector(request.available_tools)
        async for item in stream_generation(handle, generation):
            if isinstance(item, TokenDelta):
                text = detector.feed(item.text)
                if text:
                    yield ChatCompletionResponseStreamChunk(
                        text_delta=text, stop_reason="not_stopped"
                    )
                continue
            held = detector.finish(stop_reason=item.stop_reason)
            yield ChatCompletionResponseStreamChunk(
                text_delta=held.content,
                stop_reason=to_spec_stop_reason(item.stop_reason),
                tool_call=held.tool_calls[0] if held.tool_calls else None,
            )

    async def batch_chat_completion(
        self, *, tenant: str, request: BatchChatCompletionRequest
    ) -> list[ChatCompletionResponse]:
        check_batch_size(len(request.batch_dialogs), "dialogs")
        handle = self._router.handle_for(tenant=tenant, model=request.model)
        results = await generate_each(
            handle,
            [
                self._chat_request(
                    dialog,
                    request.available_tools,
                    request.sampling_params,
                    max_tokens=request.max_tokens,
                    logprobs=request.logprobs,
                )
                for dialog in request.batch_dialogs
            ],
        )
        return [self._chat_response(r, request.available_tools) for r in results]
