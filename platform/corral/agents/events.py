"""A turn's stream of spec chunks, and the one way to rebuild the turn from them: the
non-streamed response is assembled here from the same chunks a streaming client gets,
by the rules a streaming client follows (docs/agents.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from corral.api.agentic_system import (
    AgenticSystemExecuteResponseStreamChunk,
    AgenticSystemTurn,
    ExecutionStep,
    MemoryRetrievalStep,
    ModelInferenceStep,
    SafetyFilteringStep,
    SafetyViolation,
    StepType,
    ToolExecutionStep,
)
from corral.api.common import Message, ToolCall, ToolResponse
from corral.api.memory_banks import MemoryBankDocument

Chunk = AgenticSystemExecuteResponseStreamChunk
# What the turn answers when a shield stops it without a suggested response.
BLOCKED_RESPONSE = "I can't help with that."


def new_step_uuid() -> str:
    return uuid4().hex


def start(step_uuid: str, step_type: StepType) -> Chunk:
    return Chunk(event_type="step_start", step_uuid=step_uuid, step_type=step_type)


def progress(step_uuid: str, step_type: StepType, **fields: Any) -> Chunk:
    return Chunk(event_type="step_progress", step_uuid=step_uuid, step_type=step_type, **fields)


def end(step_uuid: str, step_type: StepType, **fields: Any) -> Chunk:
    return Chunk(event_type="step_end", step_uuid=step_uuid, step_type=step_type, **fields)


@dataclass
class _OpenStep:
    uuid: str
    step_type: StepType
    text: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_responses: list[ToolResponse] = field(default_factory=list)
    documents: list[MemoryBankDocument] = field(default_factory=list)
    violation: SafetyViolation | None = None


class TurnAssembler:
    """Feed it every chunk of a turn, in order; `turn()` is the AgenticSystemTurn."""

    def __init__(self) -> None:
        self._open: dict[str, _OpenStep] = {}
        self._steps: list[ExecutionStep] = []
        self._handed_over: list[ToolCall] = []  # the last inference step's unexecuted call
        self.stop_reason: str | None = None

    def feed(self, chunk: Chunk) -> None:
        if chunk.stop_reason is not None:
            self.stop_reason = chunk.stop_reason
        if chunk.event_type == "step_start":
            self._open[chunk.step_uuid] = _OpenStep(chunk.step_uuid, chunk.step_type)
            return
        step = self._open[chunk.step_uuid]
        if chunk.response_text_delta is not None:
            step.text.append(chunk.response_text_delta)
        if chunk.tool_call is not None:
            step.tool_calls.append(chunk.tool_call)
        if chunk.tool_response_delta is not None:
            step.tool_responses.append(chunk.tool_response_delta)
        if chunk.retrieved_document is not None:
            step.documents.append(chunk.retrieved_document)
        if chunk.violation is not None:
            step.violation = chunk.violation
        if chunk.event_type == "step_end":
            del self._open[chunk.step_uuid]
            self._close(step)

    def _close(self, step: _OpenStep) -> None:
        if step.step_type == "model_inference":
            self._steps.append(
                ModelInferenceStep(
                    step_type=step.step_type, uuid=step.uuid, text="".join(step.text)
                )
            )
            self._handed_over = step.tool_calls
        elif step.step_type == "tool_execution":
            self._steps.append(
                ToolExecutionStep(
                    step_type=step.step_type,
                    uuid=step.uuid,
                    tool_calls=step.tool_calls,
                    tool_responses=step.tool_responses,
                )
            )
            self._handed_over = []
        elif step.step_type == "safety_filtering":
            self._steps.append(
                SafetyFilteringStep(
                    step_type=step.step_type, uuid=step.uuid, violation=step.violation
                )
            )
        else:
            scores = [_score(document) for document in step.documents]
            self._steps.append(
                MemoryRetrievalStep(
                    step_type=step.step_type,
                    uuid=step.uuid,
                    documents=step.documents,
                    scores=scores,
                )
            )

    def turn(self, user_messages: list[Message]) -> AgenticSystemTurn:
        """The turn: its steps, and a response message that is the shield's suggested
        response when a shield stopped the turn, else the last inference step's text
        with the tool call it handed to the client, if any."""
        violation = next(
            (
                step.violation
                for step in self._steps
                if isinstance(step, SafetyFilteringStep) and step.violation is not None
            ),
            None,
        )
        if violation is not None:
            response = Message(
                role="assistant",
                content=violation.suggested_user_response or BLOCKED_RESPONSE,
                tool_calls=[],
                tool_responses=[],
            )
        else:
            inference = [s for s in self._steps if isinstance(s, ModelInferenceStep)]
            response = Message(
                role="assistant",
                content=inference[-1].text if inference else "",
                tool_calls=self._handed_over,
                tool_responses=[],
            )
        return AgenticSystemTurn(
            user_messages=user_messages, steps=self._steps, response_message=response
        )


def _score(document: MemoryBankDocument) -> float:
    value = document.metadata.get("score")
    return float(value) if isinstance(value, int | float) else 0.0
