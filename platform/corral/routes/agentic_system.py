"""Agentic system routes. No agent runtime is wired in yet: each operation validates its
request, then answers 501 naming the missing capability."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from corral.api.agentic_system import (
    AgenticSystemCreateRequest,
    AgenticSystemCreateResponse,
    AgenticSystemExecuteRequest,
    AgenticSystemExecuteResponse,
    AgenticSystemExecuteResponseStreamChunk,
)
from corral.api.common import Id
from corral.errors import CapabilityUnavailable
from corral.routes.responses import OK

router = APIRouter(tags=["AgenticSystem"])


def _unavailable() -> CapabilityUnavailable:
    return CapabilityUnavailable(
        "agentic_system", "no agent runtime (agent store and step loop) is in this build yet"
    )


@router.post("/agentic_system/create", response_description=OK, response_model_exclude_none=True)
def create_agentic_system(body: AgenticSystemCreateRequest) -> AgenticSystemCreateResponse:
    raise _unavailable()


@router.post(
    "/agentic_system/execute",
    response_model=AgenticSystemExecuteResponse | AgenticSystemExecuteResponseStreamChunk,
    response_description=OK,
    response_model_exclude_none=True,
)
def execute_agentic_system(
    body: AgenticSystemExecuteRequest,
) -> AgenticSystemExecuteResponse | AgenticSystemExecuteResponseStreamChunk:
    raise _unavailable()


@router.delete("/agentic_system/delete", response_class=Response, response_description=OK)
def delete_agentic_system(agent_id: Id) -> Response:
    raise _unavailable()
