"""OpenAI-compatible models: the subset of OpenAI's Models, Completions and Chat
Completions APIs that Corral serves under `/v1`.

Requests refuse unknown fields, as the spec's objects do: a feature Corral does not
implement (images, `response_format`, `top_logprobs`, ...) is a 422 rather than silently
ignored. Fields clients often send with their neutral value (`n=1`, `presence_penalty=0`,
`echo=false`, ...) are accepted with that value only. Responses carry OpenAI's field
names and `object` values exactly.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from corral.api.common import Id, JsonObject

FinishReason = Literal["stop", "length", "tool_calls"]


def only(*supported: object) -> AfterValidator:
    """A field Corral accepts only with one of these values (OpenAI's neutral ones)."""
    shown = " or ".join(repr(value) for value in supported)

    def check(value: Any) -> Any:
        if value not in supported:
            raise ValueError(f"only {shown} is supported")
        return value

    return AfterValidator(check)


def _no_entries(value: dict[str, float] | None) -> dict[str, float] | None:
    if value:
        raise ValueError("logit_bias is not supported")
    return value


class OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


# Up to four stop strings, as OpenAI allows; generation output is cut before the first.
StopStrings = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class SamplingFields(OpenAIRequest):
    """What completions and chat completions share. None means OpenAI's default."""

    model: Id
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="Default 1.")
    top_p: float | None = Field(default=None, ge=0.0, le=1.0, description="Default 1.")
    n: Annotated[int, only(1)] = 1
    stop: StopStrings | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, only(0)] = 0.0
    frequency_penalty: Annotated[float, only(0)] = 0.0
    logit_bias: Annotated[dict[str, float] | None, AfterValidator(_no_entries)] = None
    user: str | None = None

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# --- models -------------------------------------------------------------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# --- completions --------------------------------------------------------------------


class CompletionCreate(SamplingFields):
    """`POST /v1/completions`: one choice per prompt."""

    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int | None = Field(
        default=16, ge=1, description="Default 16, as OpenAI; null: up to the model's limit."
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=5,
        description="Any value returns the chosen tokens' log-probabilities; "
        "alternatives (top_logprobs) are not returned.",
    )
    echo: Annotated[bool, only(False)] = False
    best_of: Annotated[int | None, only(None, 1)] = None
    suffix: Annotated[str | None, only(None)] = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionLogprobs(BaseModel):
    tokens: list[str] | None = None
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, *, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class Completion(BaseModel):
    """A completion, and also each chunk of a streamed one (as OpenAI sends them)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# --- chat completions ---------------------------------------------------------------


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class FunctionCall(OpenAIRequest):
    name: str
    arguments: str = Field(description="The arguments as a JSON object, encoded as a string.")


class MessageToolCall(OpenAIRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIRequest):
    """One message of the conversation. `developer` is read as `system`."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    refusal: Annotated[str | None, only(None)] = None

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if (self.tool_call_id is None) == (self.role == "tool"):
            raise ValueError("tool messages, and only they, carry a tool_call_id")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class FunctionDefinition(OpenAIRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: JsonObject | None = Field(
        default=None, description="A JSON schema of the arguments object."
    )
    strict: Annotated[bool | None, only(None, False)] = None


class Tool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class ChatCompletionCreate(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: bool | None = Field(
        default=None, description="Accepted; Llama 3.1 makes at most one call per reply."
    )
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Takes precedence over max_tokens."
    )
    logprobs: Annotated[bool | None, only(None, False)] = None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatDelta(BaseModel):
    """What a chunk adds; fields it does not set are left out, as OpenAI does."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        fields: dict[str, Any] = handler(self)
        return {name: value for name, value in fields.items() if value is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
