"""Datasets routes: HTTP only; the DatasetService does the work."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from corral.api.common import Id
from corral.api.datasets import CreateDatasetRequest, Dataset
from corral.deps import DatasetServiceDep, TenantDep
from corral.routes.responses import OK, empty_ok

router = APIRouter(tags=["Datasets"])


@router.post("/datasets/create", response_class=Response, response_description=OK)
def create_dataset(
    body: CreateDatasetRequest, tenant: TenantDep, datasets: DatasetServiceDep
) -> Response:
    datasets.create(tenant=tenant, request=body)
    return empty_ok()


@router.get("/datasets/get", response_description=OK, response_model_exclude_none=True)
def get_dataset(dataset_id: Id, tenant: TenantDep, datasets: DatasetServiceDep) -> Dataset:
    return datasets.get(tenant=tenant, dataset_id=dataset_id)


@router.delete("/datasets/delete", response_class=Response, response_description=OK)
def delete_dataset(dataset_id: Id, tenant: TenantDep, datasets: DatasetServiceDep) -> Response:
    datasets.delete(tenant=tenant, dataset_id=dataset_id)
    return empty_ok()
