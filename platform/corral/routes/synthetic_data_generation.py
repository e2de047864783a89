"""Synthetic data generation routes: HTTP only; the SyntheticDataService does the work.

- `POST /synthetic_data_generation/generate` (the spec's): answers at once, up to a size
  cap (CORRAL_SDG_MAX_SYNC_GENERATIONS generations; beyond it a 422 names the job route).
  Plain `def`: FastAPI runs it in a worker thread, so the pipeline's wait is off the
  event loop.
- `POST /synthetic_data_generation/jobs` (Corral's, tag "Corral"): the same request with a
  client-chosen `job_uuid` and an `output` dataset, run as a job of kind
  `synthetic_data_generation`; its status, logs, metrics and cancellation are the generic
  `/jobs/{job_uuid}...` routes'.
"""

from __future__ import annotations

from fastapi import APIRouter

from corral.api.jobs import JobSummary
from corral.api.synthetic_data_generation import (
    SyntheticDataGenerationRequest,
    SyntheticDataGenerationResponse,
    SyntheticDataJobRequest,
)
from corral.deps import SyntheticDataServiceDep, TenantDep
from corral.routes.responses import OK

router = APIRouter(tags=["SyntheticDataGeneration"])
jobs_router = APIRouter(tags=["Corral"])


@router.post(
    "/synthetic_data_generation/generate",
    response_description=OK,
    response_model_exclude_none=True,
)
def generate(
    body: SyntheticDataGenerationRequest,
    tenant: TenantDep,
    synthetic_data: SyntheticDataServiceDep,
) -> SyntheticDataGenerationResponse:
    return synthetic_data.generate(tenant=tenant, request=body)


@jobs_router.post("/synthetic_data_generation/jobs", response_description=OK)
def submit_job(
    body: SyntheticDataJobRequest, tenant: TenantDep, synthetic_data: SyntheticDataServiceDep
) -> JobSummary:
    """Run a generation request as a job (idempotent by `job_uuid`); its summary."""
    return synthetic_data.submit_job(tenant=tenant, request=body)
