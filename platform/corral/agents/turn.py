"""One agent turn, as the spec's steps, streamed as the spec's chunks:

    input shields (safety_filtering)        a violation ends the turn with its response
    memory retrieval (memory_retrieval)     the agent's banks, queried with the user's text
    model inference (model_inference)  ─┐   the model answers, or calls a tool:
    tool execution (tool_execution)    ─┘     a server tool runs and the model goes on;
                                              a client tool ends the turn with the call
    output shields (safety_filtering)       a violation replaces the answer

Streaming and non-streaming share this one generator: the non-streamed turn is assembled
from the same chunks (`corral.agents.events.TurnAssembler`). The last chunk carries the
turn's stop_reason (docs/agents.md has the mapping).

Only tools in the agent's `available_tools` are offered to the model, and only those are
ever read out of its reply; of those only `executable_tools` run here. Text that asks for
another tool (a retrieved document saying "call code_interpreter") stays text."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from corral.agents import events
from corral.agents.context import MAX_CHUNKS, PER_BANK_TOP_K, PromptParts, fit, replay
from corral.agents.events import Chunk, new_step_uuid
from corral.agents.protocols import Shield, Tool, ToolFailed, ToolUnavailable
from corral.api.agentic_system import AgenticSystemCreateRequest, AgenticSystemTurn, SafetyViolation
from corral.api.common import Content, Message, StopReason, ToolCall, ToolResponse
from corral.api.memory_banks import MemoryBankDocument
from corral.llama3 import ToolCallStreamDetector, strip_special_tokens, to_spec_stop_reason
from corral.memory.types import RetrievedChunk, Retriever
from corral.services.model_calls import PromptTokens
from serve_apps.engines.protocol import (
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    TokenDelta,
)


class ChatModel(Protocol):
    """The agent's model: its stream, and its tokenizer's counts (None if it has none)."""

    async def prompt_tokens(self, prompts: list[str]) -> PromptTokens | None: ...

    def stream(
        self, request: GenerationRequest
    ) -> AsyncIterator[TokenDelta | GenerationResult]: ...


@dataclass(frozen=True)
class ToolShields:
    inputs: Sequence[Shield] = ()
    outputs: Sequence[Shield] = ()


@dataclass(frozen=True)
class Agent:
    """An agent ready to run: its stored definition and what was built from it."""

    definition: AgenticSystemCreateRequest
    tenant: str
    model: ChatModel
    retriever: Retriever | None
    tools: Mapping[str, Tool]  # the executable ones, by name
    input_shields: Sequence[Shield] = ()
    output_shields: Sequence[Shield] = ()
    tool_shields: Mapping[str, ToolShields] = field(default_factory=dict)
    max_inference_steps: int = 10
    tool_timeout_s: float = 30.0


@dataclass
class _Outcome:
    stop_reason: StopReason = "finished_ok"


async def run_turn(
    agent: Agent, *, messages: Sequence[Message], history: Sequence[AgenticSystemTurn]
) -> AsyncIterator[Chunk]:
    """The turn's chunks; the last one carries the stop_reason."""
    outcome = _Outcome()
    held: Chunk | None = None
    async for chunk in _steps(agent, list(messages), history, outcome):
        if held is not None:
            yield held
        held = chunk
    assert held is not None and held.event_type == "step_end"
    yield held.model_copy(update={"stop_reason": outcome.stop_reason})


async def _steps(
    agent: Agent,
    messages: list[Message],
    history: Sequence[AgenticSystemTurn],
    outcome: _Outcome,
) -> AsyncIterator[Chunk]:
    past = [replay(turn) for turn in history]
    conversation = [message for turn in past for message in turn] + messages

    # 1. Input shields.
    chunks, violation = await _shield_step(agent.input_shields, conversation)
    for chunk in chunks:
        yield chunk
    if violation is not None:
        return

    # 2. Memory retrieval.
    retrieved: list[RetrievedChunk] = []
    query = _user_text(messages)
    if agent.definition.memory_bank_uuids and query:
        chunks, retrieved = await _retrieval_step(agent, query)
        for chunk in chunks:
            yield chunk

    # 3. Model inference ⇄ tool execution.
    available = {tool.tool_name for tool in agent.definition.available_tools}
    executable = available & set(agent.definition.executable_tools) & set(agent.tools)
    parts = PromptParts(
        instructions=agent.definition.instructions,
        tools=agent.definition.available_tools,
        history=past,
        current=messages,
        chunks=retrieved,
    )
    exchange: list[Message] = []
    answer = ""
    handed: list[ToolCall] = []  # a call the turn ends with, for the client to run
    for step_number in range(1, agent.max_inference_steps + 1):
        inference = _Inference()
        async for chunk in _inference_step(agent, parts, exchange, inference):
            yield chunk
        answer = inference.text
        call = inference.call
        if call is None or call.tool_name not in available:
            outcome.stop_reason = inference.stop_reason
            break
        if call.tool_name not in executable:
            handed = [call]
            outcome.stop_reason = "finished_ok"  # the client runs it and sends the result
            break
        if step_number == agent.max_inference_steps:
            handed = [call]
            outcome.stop_reason = "not_stopped"  # the step limit: the call is not run
            break
        calling = Message(role="assistant", content=answer, tool_calls=[call], tool_responses=[])
        shields = agent.tool_shields.get(call.tool_name, ToolShields())
        chunks, violation = await _shield_step(shields.inputs, [*conversation, *exchange, calling])
        for chunk in chunks:
            yield chunk
        if violation is not None:
            return
        response = await _run_tool(agent, call)
        for chunk in _tool_chunks(call, response):
            yield chunk
        answered = Message(role="tool", content="", tool_calls=[], tool_responses=[response])
        chunks, violation = await _shield_step(
            shields.outputs, [*conversation, *exchange, calling, answered]
        )
        for chunk in chunks:
            yield chunk
        if violation is not None:
            return
        exchange += [calling, answered]

    # 4. Output shields.
    reply = Message(role="assistant", content=answer, tool_calls=handed, tool_responses=[])
    chunks, violation = await _shield_step(agent.output_shields, [*conversation, *exchange, reply])
    for chunk in chunks:
        yield chunk
    if violation is not None:
        outcome.stop_reason = "finished_ok"


async def _shield_step(
    shields: Sequence[Shield], messages: Sequence[Message]
) -> tuple[list[Chunk], SafetyViolation | None]:
    """One safety_filtering step running the shields in order; the first violation
    stops it. No shields, no step."""
    if not shields:
        return [], None
    step = new_step_uuid()
    violation = None
    for shield in shields:
        violation = await shield.check(messages)
        if violation is not None:
            break
    return [
        events.start(step, "safety_filtering"),
        events.end(step, "safety_filtering", violation=violation),
    ], violation


async def _retrieval_step(agent: Agent, query: str) -> tuple[list[Chunk], list[RetrievedChunk]]:
    """Each bank's best PER_BANK_TOP_K chunks; the best MAX_CHUNKS of all, by score."""
    assert agent.retriever is not None  # agents with banks are refused without one
    step = new_step_uuid()
    found: list[RetrievedChunk] = []
    for bank_uuid in agent.definition.memory_bank_uuids:
        found += await agent.retriever.query(
            tenant=agent.tenant, bank_uuid=bank_uuid, query=query, top_k=PER_BANK_TOP_K
        )
    found = sorted(found, key=lambda chunk: chunk.score, reverse=True)[:MAX_CHUNKS]
    chunks = [events.start(step, "memory_retrieval")]
    chunks += [
        events.progress(step, "memory_retrieval", retrieved_document=_document(chunk))
        for chunk in found
    ]
    chunks.append(events.end(step, "memory_retrieval"))
    return chunks, found


def _document(chunk: RetrievedChunk) -> MemoryBankDocument:
    """A retrieved chunk as the spec's document: its text, and in its metadata what a
    client needs to cite it (the score too, since a stream has no scores field)."""
    return MemoryBankDocument(
        uuid=chunk.chunk_id,
        content=base64.b64encode(chunk.text.encode()).decode(),
        mime_type="text/plain",
        metadata={
            **chunk.metadata,
            "document_uuid": chunk.document_uuid,
            "chunk_id": chunk.chunk_id,
            "bank_uuid": chunk.bank_uuid,
            "start": chunk.start,
            "end": chunk.end,
            "score": chunk.score,
        },
    )


@dataclass
class _Inference:
    text: str = ""
    call: ToolCall | None = None
    stop_reason: StopReason = "finished_ok"


async def _inference_step(
    agent: Agent, parts: PromptParts, exchange: Sequence[Message], inference: _Inference
) -> AsyncIterator[Chunk]:
    """The model's reply as text deltas; a reply that is a tool call is held back and
    sent as the step's `tool_call`."""
    step = new_step_uuid()
    yield events.start(step, "model_inference")
    fitted = await fit(replace(parts, exchange=tuple(exchange)), agent.model.prompt_tokens)
    request = GenerationRequest(
        prompt=fitted.prompt, sampling=SamplingOptions(max_tokens=fitted.max_tokens)
    )
    detector = ToolCallStreamDetector(agent.definition.available_tools)
    result: GenerationResult | None = None
    async for item in agent.model.stream(request):
        if isinstance(item, TokenDelta):
            text = detector.feed(item.text)
            if text:
                inference.text += text
                yield events.progress(step, "model_inference", response_text_delta=text)
        else:
            result = item
    assert result is not None, "an engine stream ends with its result"
    held = detector.finish(stop_reason=result.stop_reason)
    if held.content:
        inference.text += held.content
        yield events.progress(step, "model_inference", response_text_delta=held.content)
    if held.tool_calls:
        inference.call = held.tool_calls[0]
        yield events.progress(step, "model_inference", tool_call=inference.call)
    inference.stop_reason = to_spec_stop_reason(result.stop_reason)
    yield events.end(step, "model_inference")


async def _run_tool(agent: Agent, call: ToolCall) -> ToolResponse:
    """The tool's response; a failure becomes a response the model can read."""
    tool = agent.tools[call.tool_name]
    try:
        response = await asyncio.wait_for(tool.run(call), timeout=agent.tool_timeout_s)
    except (ToolFailed, ToolUnavailable) as exc:
        return ToolResponse(tool_name=call.tool_name, content=f"error: {exc}")
    except TimeoutError:
        return ToolResponse(
            tool_name=call.tool_name,
            content=f"error: the tool did not answer within {agent.tool_timeout_s:g} s",
        )
    return response.model_copy(
        update={"tool_name": call.tool_name, "content": _clean(response.content)}
    )


def _tool_chunks(call: ToolCall, response: ToolResponse) -> list[Chunk]:
    step = new_step_uuid()
    return [
        events.start(step, "tool_execution"),
        events.progress(step, "tool_execution", tool_call=call),
        events.progress(step, "tool_execution", tool_response_delta=response),
        events.end(step, "tool_execution"),
    ]


def _clean(content: Content) -> Content:
    """Tool output goes into the next prompt: no special tokens in it."""
    if isinstance(content, str):
        return strip_special_tokens(content)
    if isinstance(content, list):
        return [strip_special_tokens(p) if isinstance(p, str) else p for p in content]
    return content


def _user_text(messages: Sequence[Message]) -> str:
    """The retrieval query: the text of the current user messages."""
    texts = [m.content for m in messages if m.role == "user" and isinstance(m.content, str)]
    texts += [
        part
        for m in messages
        if m.role == "user" and isinstance(m.content, list)
        for part in m.content
        if isinstance(part, str)
    ]
    return "\n".join(text.strip() for text in texts if text.strip())
