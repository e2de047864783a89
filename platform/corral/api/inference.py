"""Inference: completion and chat completion, one at a time or in batches."""

from __future__ import annotations

from pydantic import Field

from corral.api.common import (
    Content,
    Dialog,
    InstructModel,
    JsonObject,
    PretrainedModel,
    SamplingParams,
    SpecModel,
    StopReason,
    ToolCall,
    ToolDefinition,
    spec_default,
)

_MAX_TOKENS_DOC = "At least 0; 0 means up to the model's limit."


class CompletionRequest(SpecModel):
    content: Content
    model: PretrainedModel
    sampling_params: SamplingParams
    max_tokens: int = Field(ge=0, json_schema_extra=spec_default(0), description=_MAX_TOKENS_DOC)
    stream: bool = Field(json_schema_extra=spec_default(False))
    logprobs: bool = Field(json_schema_extra=spec_default(False))


class CompletionResponse(SpecModel):
    """Normal completion response."""

    content: Content
    stop_reason: StopReason | None = None
    logprobs: JsonObject | None = None


class CompletionResponseStreamChunk(SpecModel):
    """streamed completion response."""

    text_delta: str
    stop_reason: StopReason | None = None
    logprobs: JsonObject | None = None


class BatchCompletionRequest(SpecModel):
    model: PretrainedModel
    content_batch: list[Content]
    sampling_params: SamplingParams
    max_tokens: int = Field(ge=0, json_schema_extra=spec_default(0), description=_MAX_TOKENS_DOC)
    logprobs: bool = Field(json_schema_extra=spec_default(False))


class ChatCompletionRequest(SpecModel):
    model: InstructModel
    dialog: Dialog
    sampling_params: SamplingParams
    available_tools: list[ToolDefinition]
    max_tokens: int = Field(ge=0, json_schema_extra=spec_default(0), description=_MAX_TOKENS_DOC)
    stream: bool = Field(json_schema_extra=spec_default(False))
    logprobs: bool = Field(json_schema_extra=spec_default(False))


class ChatCompletionResponse(SpecModel):
    """Normal chat completion response."""

    content: Content
    tool_calls: list[ToolCall]
    stop_reason: StopReason | None = None
    logprobs: JsonObject | None = None


class ChatCompletionResponseStreamChunk(SpecModel):
    """Streamed chat completion response. The actual response is a series of such
    objects."""

    text_delta: str
    stop_reason: StopReason | None = None
    tool_call: ToolCall | None = None


class BatchChatCompletionRequest(SpecModel):
    model: InstructModel
    batch_dialogs: list[Dialog]
    sampling_params: SamplingParams
    available_tools: list[ToolDefinition]
    max_tokens: int = Field(ge=0, json_schema_extra=spec_default(0), description=_MAX_TOKENS_DOC)
    logprobs: bool = Field(json_schema_extra=spec_default(False))
