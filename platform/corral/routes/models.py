"""Corral's models routes (tag "Corral": not part of the Llama Stack spec): list what is
served, register a checkpoint or adapter, scale replicas, delete. HTTP only; the
ModelService does the work, and decides what only an operator may do (scaling a shared
model); `GET /models?all=true` (every tenant's models) is for operators only. Handlers
are sync: they wait on Ray, so FastAPI runs them in its thread pool."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from corral.api.common import Id
from corral.api.models import (
    ModelInfo,
    ModelList,
    RegisterModelRequest,
    ScaleModelRequest,
    ScaleModelResponse,
)
from corral.deps import ModelServiceDep, OperatorDep, TenantDep
from corral.errors import Forbidden
from corral.routes.responses import OK, empty_ok

TAG = "Corral"
router = APIRouter(tags=[TAG])


@router.get("/models", response_description=OK)
def list_models(
    tenant: TenantDep,
    operator: OperatorDep,
    models: ModelServiceDep,
    all_tenants: Annotated[
        bool,
        Query(
            alias="all",
            description="Every tenant's registered models, each with its tenant "
            "(operator keys only).",
        ),
    ] = False,
) -> ModelList:
    if all_tenants and not operator:
        raise Forbidden("listing every tenant's models needs an operator key")
    return ModelList(data=models.list(tenant, all_tenants=all_tenants))


@router.post("/models/register", response_description=OK)
def register_model(
    body: RegisterModelRequest, tenant: TenantDep, models: ModelServiceDep
) -> ModelInfo:
    return models.register(tenant=tenant, request=body)


@router.post("/models/scale", response_description=OK)
def scale_model(
    body: ScaleModelRequest, tenant: TenantDep, operator: OperatorDep, models: ModelServiceDep
) -> ScaleModelResponse:
    info = models.scale(
        tenant=tenant,
        model=body.model,
        min_replicas=body.min_replicas,
        max_replicas=body.max_replicas,
        replicas=body.replicas,
        operator=operator,
    )
    return ScaleModelResponse(
        name=info.name,
        min_replicas=info.min_replicas,
        max_replicas=info.max_replicas,
        replicas=info.replicas,
    )


@router.delete("/models/delete", response_class=Response, response_description=OK)
def delete_model(
    model: Id, tenant: TenantDep, operator: OperatorDep, models: ModelServiceDep
) -> Response:
    models.unregister(tenant=tenant, model=model, operator=operator)
    return empty_ok()
