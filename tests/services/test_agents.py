"""AgentService on a real database: creation checks every part of an agent before it is
stored, is idempotent by uuid, and is scoped by tenant."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from corral.agents.protocols import Shield, ToolUnavailable
from corral.api.agentic_system import AgenticSystemCreateRequest, AgenticSystemExecuteRequest
from corral.api.common import Message, ShieldConfig, ToolDefinition
from corral.errors import CapabilityUnavailable, Conflict, InvalidRequest, NotFound
from corral.services.agents import AgentService
from corral.services.inference import NoModels
from corral.store.agents import AgentStore
from corral.store.db import Database
from tests.agents.test_turn import FakeRetriever, RecordingTool, WordShield


class FakeRouter:
    """llama3_8b_chat is an llm; llama3_70b_chat is some other kind; nothing else exists."""

    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> Any:
        if model == "llama3_70b_chat":
            raise InvalidRequest(f"model {model!r} is a reward model, not an llm")
        if model != "llama3_8b_chat":
            raise NotFound(f"no model {model!r}")
        return object()


class OnlyLlamaGuard:
    def build(self, config: ShieldConfig, *, tenant: str) -> Shield:
        if config.shield_type != "llama_guard":
            raise InvalidRequest(f"no {config.shield_type} here")
        return WordShield("bomb")

    async def build_checked(self, config: ShieldConfig, *, tenant: str) -> Shield:
        return self.build(config, tenant=tenant)


class Unavailable(RecordingTool):
    def ensure_available(self) -> None:
        raise ToolUnavailable("web_search needs an API key (web_search_api_key)")


def request(**changes: Any) -> AgenticSystemCreateRequest:
    body: dict[str, Any] = {
        "uuid": "agent-1",
        "instructions": "Be brief.",
        "model": "llama3_8b_chat",
        "available_tools": [],
        "executable_tools": [],
        "memory_bank_uuids": [],
        "input_shields": [],
        "output_shields": [],
    } | changes
    return AgenticSystemCreateRequest.model_validate(body)


def tool(name: str, **extra: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"input_shields": [], "output_shields": []} | extra
    return ToolDefinition(tool_name=name, **fields).model_dump()


@pytest.fixture
def service(sqlite_database: Database) -> AgentService:
    return AgentService(
        database=sqlite_database,
        router=FakeRouter(),
        retriever=FakeRetriever({"bank-1": []}),
        tools={"math": RecordingTool("math"), "web_search": Unavailable("web_search")},
        shields=OnlyLlamaGuard(),
    )


def create(service: AgentService, tenant: str = "alpha", **changes: Any) -> str:
    return asyncio.run(service.create(tenant=tenant, request=request(**changes)))


def test_create_is_idempotent_and_a_different_body_conflicts(
    service: AgentService, sqlite_database: Database
) -> None:
    assert create(service) == "agent-1"
    assert create(service) == "agent-1"
    with pytest.raises(Conflict, match="different definition"):
        create(service, instructions="Be verbose.")
    # Another tenant's agent of the same uuid is its own.
    assert create(service, tenant="beta", instructions="Be verbose.") == "agent-1"
    with sqlite_database.transaction() as session:
        stored = AgentStore(session).get(tenant="alpha", uuid="agent-1")
        assert stored is not None and stored.config["instructions"] == "Be brief."


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "llama3_70b_chat"}, "not an llm"),
        ({"memory_bank_uuids": ["nope"]}, "no memory bank 'nope'"),
        ({"input_shields": [{"shield_type": "prompt_guard", "params": {}}]}, "no prompt_guard"),
        (
            {
                "available_tools": [
                    tool("get_weather", input_shields=[{"shield_type": "code_guard", "params": {}}])
                ]
            },
            "no code_guard",
        ),
        (
            {"available_tools": [tool("math")], "executable_tools": ["web_search"]},
            "not in available_tools",
        ),
        (
            {"available_tools": [tool("get_weather")], "executable_tools": ["get_weather"]},
            "cannot be executed",
        ),
        (
            {"available_tools": [tool("web_search")], "executable_tools": ["web_search"]},
            "needs an API key",
        ),
        ({"available_tools": [tool("math"), tool("math")]}, "more than once"),
        ({"instructions": "hi <|eot_id|>"}, "special token"),
        ({"uuid": "../etc"}, "agent uuid"),
    ],
)
def test_create_refuses_what_cannot_run_and_stores_nothing(
    service: AgentService, sqlite_database: Database, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        create(service, **changes)
    with sqlite_database.transaction() as session:
        assert AgentStore(session).get(tenant="alpha", uuid=changes.get("uuid", "agent-1")) is None


class _NoSuchModel:
    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> Any:
        raise NotFound(f"no model {model!r}")


def test_an_unknown_model_is_a_422(sqlite_database: Database) -> None:
    service = AgentService(database=sqlite_database, router=_NoSuchModel())
    with pytest.raises(InvalidRequest, match="no model 'llama3_8b_chat'"):
        asyncio.run(service.create(tenant="alpha", request=request()))


def test_banks_need_a_retriever_and_shields_need_a_factory(sqlite_database: Database) -> None:
    bare = AgentService(database=sqlite_database, router=FakeRouter())
    with pytest.raises(InvalidRequest, match="no memory banks"):
        asyncio.run(bare.create(tenant="alpha", request=request(memory_bank_uuids=["bank-1"])))
    shielded = request(output_shields=[{"shield_type": "llama_guard", "params": {}}])
    with pytest.raises(InvalidRequest, match="no shields are configured"):
        asyncio.run(bare.create(tenant="alpha", request=shielded))


def test_a_server_without_ray_answers_501_for_agents(sqlite_database: Database) -> None:
    service = AgentService(database=sqlite_database, router=NoModels())
    with pytest.raises(CapabilityUnavailable) as caught:
        asyncio.run(service.create(tenant="alpha", request=request()))
    assert caught.value.capability == "agentic_system"


def test_delete_and_execute_are_tenant_scoped(service: AgentService) -> None:
    create(service)
    turn = AgenticSystemExecuteRequest(
        agent_uuid="agent-1",
        messages=[Message(role="user", content="hi", tool_calls=[], tool_responses=[])],
        turn_history=[],
        stream=False,
    )
    with pytest.raises(NotFound):
        service.execute_stream(tenant="beta", request=turn)
    with pytest.raises(NotFound):
        service.delete(tenant="beta", agent_id="agent-1")
    service.delete(tenant="alpha", agent_id="agent-1")
    with pytest.raises(NotFound):
        service.delete(tenant="alpha", agent_id="agent-1")


def test_execute_refuses_a_system_message_in_a_turn(service: AgentService) -> None:
    create(service)
    turn = AgenticSystemExecuteRequest(
        agent_uuid="agent-1",
        messages=[Message(role="system", content="obey", tool_calls=[], tool_responses=[])],
        turn_history=[],
        stream=False,
    )
    with pytest.raises(InvalidRequest, match="role user or tool"):
        service.execute_stream(tenant="alpha", request=turn)
