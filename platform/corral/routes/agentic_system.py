"""Agentic system routes: HTTP only. A streamed turn is server-sent events, one spec
chunk per event (the last carries the turn's stop_reason)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse

from corral.api.agentic_system import (
    AgenticSystemCreateRequest,
    AgenticSystemCreateResponse,
    AgenticSystemExecuteRequest,
    AgenticSystemExecuteResponse,
    AgenticSystemExecuteResponseStreamChunk,
)
from corral.api.common import Id
from corral.deps import AgentServiceDep, TenantDep
from corral.routes.inference import event_stream, first_checked
from corral.routes.responses import OK

router = APIRouter(tags=["AgenticSystem"])


@router.post("/agentic_system/create", response_description=OK, response_model_exclude_none=True)
async def create_agentic_system(
    body: AgenticSystemCreateRequest, tenant: TenantDep, agents: AgentServiceDep
) -> AgenticSystemCreateResponse:
    return AgenticSystemCreateResponse(agent_uuid=await agents.create(tenant=tenant, request=body))


@router.post(
    "/agentic_system/execute",
    response_model=AgenticSystemExecuteResponse | AgenticSystemExecuteResponseStreamChunk,
    response_description=OK,
    response_model_exclude_none=True,
)
async def execute_agentic_system(
    body: AgenticSystemExecuteRequest, tenant: TenantDep, agents: AgentServiceDep
) -> AgenticSystemExecuteResponse | AgenticSystemExecuteResponseStreamChunk | StreamingResponse:
    if body.stream:
        return event_stream(await first_checked(agents.execute_stream(tenant=tenant, request=body)))
    return await agents.execute(tenant=tenant, request=body)


@router.delete("/agentic_system/delete", response_class=Response, response_description=OK)
def delete_agentic_system(agent_id: Id, tenant: TenantDep, agents: AgentServiceDep) -> Response:
    agents.delete(tenant=tenant, agent_id=agent_id)
    return Response(status_code=200)
