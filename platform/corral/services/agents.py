"""Agents: created once per (tenant, uuid) after every part of them was checked to work
here, deleted, and executed turn by turn (corral.agents.turn)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.serve.handle import DeploymentHandle
from sqlalchemy.exc import IntegrityError

from corral.agents.events import Chunk, TurnAssembler
from corral.agents.protocols import Shield, ShieldFactory, Tool, ToolUnavailable
from corral.agents.turn import Agent, ToolShields, run_turn
from corral.api.agentic_system import (
    AgenticSystemCreateRequest,
    AgenticSystemExecuteRequest,
    AgenticSystemExecuteResponse,
)
from corral.api.common import Message, ShieldConfig
from corral.config import Settings
from corral.errors import CapabilityUnavailable, Conflict, InvalidRequest, NotFound
from corral.llama3 import format_chat
from corral.memory.types import Retriever
from corral.services.ids import check_id
from corral.services.inference import ModelRouter
from corral.services.model_calls import PromptTokens, prompt_tokens, stream_generation
from corral.store.agents import AgentStore
from corral.store.db import Database
from corral.store.digest import request_digest
from serve_apps.engines.protocol import GenerationRequest, GenerationResult, TokenDelta

# The retrieval probe that checks a bank exists (the Retriever protocol has only queries).
_BANK_PROBE = "bank check"
_TURN_ROLES = frozenset({"user", "tool"})


class NoShields:
    """The ShieldFactory of a server with no shields built: every shield is refused, so
    an agent never runs with a shield that silently passes."""

    def build(self, config: ShieldConfig, *, tenant: str) -> Shield:
        raise InvalidRequest(
            f"shield type {config.shield_type!r} is not available on this server "
            "(no shields are configured)"
        )

    async def build_checked(self, config: ShieldConfig, *, tenant: str) -> Shield:
        return self.build(config, tenant=tenant)


class ServeChatModel:
    """An agent's model behind its Serve handle (corral.agents.turn.ChatModel)."""

    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self._handle = handle

    async def prompt_tokens(self, prompts: list[str]) -> PromptTokens | None:
        return await prompt_tokens(self._handle, prompts)

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationResult]:
        return stream_generation(self._handle, request)


@dataclass(frozen=True)
class AgentLimits:
    max_inference_steps: int = 10
    tool_timeout_s: float = 30.0

    @classmethod
    def from_settings(cls, settings: Settings) -> AgentLimits:
        return cls(
            max_inference_steps=settings.agent_max_inference_steps,
            tool_timeout_s=settings.tool_timeout_s,
        )


class AgentService:
    def __init__(
        self,
        *,
        database: Database,
        router: ModelRouter,
        retriever: Retriever | None = None,
        tools: Mapping[str, Tool] | None = None,
        shields: ShieldFactory | None = None,
        limits: AgentLimits = AgentLimits(),
    ) -> None:
        """`retriever`: the memory banks (without it, agents with banks are refused);
        `tools`: the tools this server can execute, by name; `shields`: builds shields
        (default: none can be built)."""
        self._db = database
        self._router = router
        self._retriever = retriever
        self._tools = dict(tools or {})
        self._shields: ShieldFactory = shields or NoShields()
        self._limits = limits

    # --- create and delete --------------------------------------------------------------

    async def create(self, *, tenant: str, request: AgenticSystemCreateRequest) -> str:
        """Store the agent after checking it can run: the same request again is a no-op,
        another one under the same uuid a Conflict."""
        uuid = check_id(request.uuid, what="agent uuid")
        config = request.model_dump(mode="json")
        digest = request_digest(config)
        stored = self._stored_digest(tenant, uuid)
        if stored is not None:
            _same_or_conflict(uuid, stored, digest)
            return uuid
        await self._check(tenant, request)
        try:
            with self._db.transaction() as session:
                AgentStore(session).add(
                    tenant=tenant, uuid=uuid, config=config, request_digest=digest
                )
        except IntegrityError:  # a concurrent create of the same uuid committed first
            _same_or_conflict(uuid, self._stored_digest(tenant, uuid), digest)
        return uuid

    def delete(self, *, tenant: str, agent_id: str) -> None:
        with self._db.transaction() as session:
            if not AgentStore(session).delete(tenant=tenant, uuid=agent_id):
                raise NotFound(f"no agent {agent_id!r}")

    def _stored_digest(self, tenant: str, uuid: str) -> str | None:
        with self._db.transaction() as session:
            row = AgentStore(session).get(tenant=tenant, uuid=uuid)
            return row.request_digest if row is not None else None

    async def _check(self, tenant: str, request: AgenticSystemCreateRequest) -> None:
        self._model(tenant, request.model)
        names = [tool.tool_name for tool in request.available_tools]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise InvalidRequest(f"available_tools names {', '.join(repeated)} more than once")
        # The instructions and tool definitions must render (no special tokens in them).
        format_chat([_system(request.instructions)], tools=request.available_tools)
        for name in request.executable_tools:
            if name not in names:
                raise InvalidRequest(f"executable tool {name!r} is not in available_tools")
            tool = self._tools.get(name)
            if tool is None:
                offered = ", ".join(sorted(self._tools)) or "none"
                raise InvalidRequest(
                    f"tool {name!r} cannot be executed on this server (executable here: {offered})"
                )
            try:
                # Its first call may probe a sandbox (a subprocess): not on the event loop.
                await asyncio.to_thread(tool.ensure_available)
            except ToolUnavailable as exc:
                raise InvalidRequest(str(exc)) from None
        for config in _shield_configs(request):
            await self._shields.build_checked(config, tenant=tenant)
        await self._check_banks(tenant, request.memory_bank_uuids)

    async def _check_banks(self, tenant: str, bank_uuids: Sequence[str]) -> None:
        if not bank_uuids:
            return
        if self._retriever is None:
            raise InvalidRequest("this server has no memory banks: create the agent without any")
        for bank_uuid in dict.fromkeys(bank_uuids):
            try:
                await self._retriever.query(
                    tenant=tenant, bank_uuid=bank_uuid, query=_BANK_PROBE, top_k=1
                )
            except NotFound:
                raise InvalidRequest(f"no memory bank {bank_uuid!r}") from None

    def _model(self, tenant: str, model: str) -> DeploymentHandle[Any]:
        """The agent's model, which must be an llm the tenant can use (422 otherwise)."""
        try:
            return self._router.handle_for(tenant=tenant, model=model)
        except NotFound as exc:
            raise InvalidRequest(f"the agent's model: {exc.message}") from None
        except CapabilityUnavailable as exc:
            raise CapabilityUnavailable(
                "agentic_system", f"agents need a model: {exc.message}"
            ) from None

    def _build_shields(
        self, tenant: str, request: AgenticSystemCreateRequest
    ) -> tuple[list[Shield], list[Shield], dict[str, ToolShields]]:
        def build(configs: Sequence[ShieldConfig]) -> list[Shield]:
            return [self._shields.build(config, tenant=tenant) for config in configs]

        tool_shields = {
            tool.tool_name: ToolShields(build(tool.input_shields), build(tool.output_shields))
            for tool in request.available_tools
            if tool.input_shields or tool.output_shields
        }
        return build(request.input_shields), build(request.output_shields), tool_shields

    # --- execute ------------------------------------------------------------------------

    async def execute(
        self, *, tenant: str, request: AgenticSystemExecuteRequest
    ) -> AgenticSystemExecuteResponse:
        """The turn, assembled from the chunks a stream of it would send."""
        assembler = TurnAssembler()
        async for chunk in self.execute_stream(tenant=tenant, request=request):
            assembler.feed(chunk)
        return AgenticSystemExecuteResponse(turn=assembler.turn(list(request.messages)))

    def execute_stream(
        self, *, tenant: str, request: AgenticSystemExecuteRequest
    ) -> AsyncIterator[Chunk]:
        """The turn's chunks. The agent and its parts are found before this returns, so
        an unknown agent is an error status, not a broken stream."""
        agent = self._agent(tenant, request.agent_uuid)
        if not request.messages:
            raise InvalidRequest("a turn needs at least one message")
        for message in request.messages:
            if message.role not in _TURN_ROLES:
                raise InvalidRequest(
                    f"a turn's messages are the user's or a client tool's results "
                    f"(role user or tool), not {message.role!r}"
                )
        return run_turn(agent, messages=request.messages, history=request.turn_history)

    def _agent(self, tenant: str, agent_uuid: str) -> Agent:
        with self._db.transaction() as session:
            row = AgentStore(session).get(tenant=tenant, uuid=agent_uuid)
            if row is None:
                raise NotFound(f"no agent {agent_uuid!r}")
            definition = AgenticSystemCreateRequest.model_validate(row.config)
        inputs, outputs, tool_shields = self._build_shields(tenant, definition)
        return Agent(
            definition=definition,
            tenant=tenant,
            model=ServeChatModel(self._model(tenant, definition.model)),
            retriever=self._retriever,
            tools={
                name: self._tools[name]
                for name in definition.executable_tools
                if name in self._tools
            },
            input_shields=inputs,
            output_shields=outputs,
            tool_shields=tool_shields,
            max_inference_steps=self._limits.max_inference_steps,
            tool_timeout_s=self._limits.tool_timeout_s,
        )


def _system(text: str) -> Message:
    return Message(role="system", content=text, tool_calls=[], tool_responses=[])


def _same_or_conflict(uuid: str, stored_digest: str | None, digest: str) -> None:
    if stored_digest is None:
        raise Conflict(f"agent {uuid!r} was deleted while it was being created; try again")
    if stored_digest != digest:
        raise Conflict(f"agent {uuid!r} already exists with a different definition")


def _shield_configs(request: AgenticSystemCreateRequest) -> list[ShieldConfig]:
    """Every shield an agent names: its own input and output shields, then its tools'."""
    configs = [*request.input_shields, *request.output_shields]
    for tool in request.available_tools:
        configs += [*tool.input_shields, *tool.output_shields]
    return configs
