"""Agentic systems: an agent (model, instructions, tools, shields, memory banks) and the
turns it executes, each a list of steps."""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from corral.api.common import (
    Id,
    InstructModel,
    JsonObject,
    Message,
    ShieldConfig,
    SpecModel,
    StopReason,
    ToolCall,
    ToolDefinition,
    ToolResponse,
    spec_default,
)
from corral.api.memory_banks import MemoryBankDocument

StepType = Literal["model_inference", "tool_execution", "safety_filtering", "memory_retrieval"]
EventType = Literal["step_start", "step_end", "step_progress"]
_STEP_TYPE_DOC = "The type of execution step."


class _ExecutionStep(SpecModel):
    """The spec types every step's `step_type` as the whole step enum, with the step's
    own value as default; a step refuses any value but its own."""

    kind: ClassVar[StepType]

    @field_validator("step_type", check_fields=False)
    @classmethod
    def _is_own_kind(cls, value: str) -> str:
        if value != cls.kind:
            raise ValueError(f"step_type of a {cls.__name__} must be {cls.kind!r}")
        return value


class ModelInferenceStep(_ExecutionStep):
    kind: ClassVar[StepType] = "model_inference"
    step_type: StepType = Field(
        description=_STEP_TYPE_DOC, json_schema_extra=spec_default("model_inference")
    )
    uuid: Id
    text: str
    logprobs: JsonObject | None = None


class ToolExecutionStep(_ExecutionStep):
    kind: ClassVar[StepType] = "tool_execution"
    step_type: StepType = Field(
        description=_STEP_TYPE_DOC, json_schema_extra=spec_default("tool_execution")
    )
    uuid: Id
    tool_calls: list[ToolCall]
    tool_responses: list[ToolResponse]


class SafetyViolation(SpecModel):
    violation_type: str
    details: str
    suggested_user_response: str | None = None


class SafetyFilteringStep(_ExecutionStep):
    kind: ClassVar[StepType] = "safety_filtering"
    step_type: StepType = Field(
        description=_STEP_TYPE_DOC, json_schema_extra=spec_default("safety_filtering")
    )
    uuid: Id
    violation: SafetyViolation | None = None


class MemoryRetrievalStep(_ExecutionStep):
    kind: ClassVar[StepType] = "memory_retrieval"
    step_type: StepType = Field(
        description=_STEP_TYPE_DOC, json_schema_extra=spec_default("memory_retrieval")
    )
    uuid: Id
    documents: list[MemoryBankDocument]
    scores: list[float]


def _step_type_of(value: Any) -> str | None:
    if isinstance(value, dict):
        found = value.get("step_type")
        return found if isinstance(found, str) else None
    return getattr(value, "step_type", None)


# Discriminated by `step_type`; the schema stays the spec's plain `oneOf`.
ExecutionStep = Annotated[
    Annotated[ModelInferenceStep, Tag("model_inference")]
    | Annotated[ToolExecutionStep, Tag("tool_execution")]
    | Annotated[SafetyFilteringStep, Tag("safety_filtering")]
    | Annotated[MemoryRetrievalStep, Tag("memory_retrieval")],
    Discriminator(_step_type_of),
]


class AgenticSystemTurn(SpecModel):
    """A single turn in an interaction with an Agentic System."""

    user_messages: list[Message]
    steps: list[ExecutionStep]
    response_message: Message


class AgenticSystemCreateRequest(SpecModel):
    uuid: Id
    instructions: str
    model: InstructModel
    available_tools: list[ToolDefinition]
    executable_tools: list[str] = Field(
        json_schema_extra={"uniqueItems": True},
        description="Tool names, each at most once (a list, to keep the caller's order).",
    )
    memory_bank_uuids: list[Id]
    input_shields: list[ShieldConfig]
    output_shields: list[ShieldConfig]

    @field_validator("executable_tools")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        repeated = sorted(name for name, count in Counter(value).items() if count > 1)
        if repeated:
            raise ValueError(f"executable_tools repeats {', '.join(repeated)}")
        return value


class AgenticSystemCreateResponse(SpecModel):
    agent_uuid: str


class AgenticSystemExecuteRequest(SpecModel):
    agent_uuid: Id
    messages: list[Message]
    turn_history: list[AgenticSystemTurn]
    stream: bool = Field(json_schema_extra=spec_default(False))


class AgenticSystemExecuteResponse(SpecModel):
    """non-stream response from the agentic system."""

    turn: AgenticSystemTurn


class AgenticSystemExecuteResponseStreamChunk(SpecModel):
    """Streamed agent execution response."""

    event_type: EventType = Field(description="The type of event.")
    step_uuid: str
    step_type: StepType = Field(description=_STEP_TYPE_DOC)
    violation: SafetyViolation | None = None
    tool_call: ToolCall | None = None
    tool_response_delta: ToolResponse | None = None
    response_text_delta: str | None = None
    retrieved_document: MemoryBankDocument | None = None
    stop_reason: StopReason | None = None
