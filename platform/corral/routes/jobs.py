"""Corral's job routes (tag "Corral": not part of the Llama Stack spec). HTTP only; the
JobsService does the work.

- `/jobs...` serve jobs of every kind: list (kind and status filters, pages), one job's
  summary, its log lines, its per-step metrics (pages by step), cancellation.
- `/post_training/jobs`, `/post_training/job`, `/post_training/job/metrics` and
  `/post_training/job/cancel` are the same for post-training jobs only (a job of another
  kind is 404 there), named the spec's way (`job_uuid` a query parameter or body field).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from corral.api.common import Id
from corral.api.jobs import (
    CancelJobRequest,
    JobKindName,
    JobList,
    JobLogs,
    JobMetrics,
    JobStatusName,
    JobSummary,
)
from corral.deps import JobsServiceDep, TenantDep
from corral.routes.responses import OK
from corral.store.jobs import TRAINING_KINDS, JobKind, JobStatus

TAG = "Corral"
router = APIRouter(tags=[TAG])
MAX_PAGE = 500
MAX_METRICS_PAGE = 10_000
# Past any real job count or step, and within every database's integer (SQLite refused
# 2**63).
MAX_OFFSET = 2**31 - 1

StatusFilter = Annotated[
    list[JobStatusName] | None, Query(description="May be given several times; any if absent.")
]
KindFilter = Annotated[
    list[JobKindName] | None, Query(description="May be given several times; any if absent.")
]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
AfterStep = Annotated[
    int | None, Query(ge=0, le=MAX_OFFSET, description="Only the steps after this one.")
]
MetricsLimit = Annotated[int, Query(ge=1, le=MAX_METRICS_PAGE, description="Steps per page.")]
JobUuidPath = Annotated[Id, Path()]


# ------------------------------------------------------------------ every kind


@router.get("/jobs", response_description=OK)
def list_all_jobs(
    tenant: TenantDep,
    jobs: JobsServiceDep,
    kind: KindFilter = None,
    status: StatusFilter = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobList:
    """The tenant's jobs of every kind, newest first."""
    return jobs.list(
        tenant=tenant,
        kinds=[JobKind(value) for value in kind or ()],
        statuses=[JobStatus(value) for value in status or ()],
        limit=limit,
        offset=offset,
    )


@router.get("/jobs/{job_uuid}", response_description=OK)
def get_any_job(job_uuid: JobUuidPath, tenant: TenantDep, jobs: JobsServiceDep) -> JobSummary:
    return jobs.get(tenant=tenant, job_uuid=job_uuid)


@router.get("/jobs/{job_uuid}/logs", response_description=OK)
def any_job_logs(job_uuid: JobUuidPath, tenant: TenantDep, jobs: JobsServiceDep) -> JobLogs:
    return jobs.logs(tenant=tenant, job_uuid=job_uuid)


@router.get("/jobs/{job_uuid}/metrics", response_description=OK)
def any_job_metrics(
    job_uuid: JobUuidPath,
    tenant: TenantDep,
    jobs: JobsServiceDep,
    after_step: AfterStep = None,
    limit: MetricsLimit = 1000,
) -> JobMetrics:
    """The job's per-step metrics in step order; `next_after_step` pages on."""
    return jobs.metrics(tenant=tenant, job_uuid=job_uuid, after_step=after_step, limit=limit)


@router.post("/jobs/{job_uuid}/cancel", response_description=OK)
def cancel_any_job(job_uuid: JobUuidPath, tenant: TenantDep, jobs: JobsServiceDep) -> JobSummary:
    return jobs.cancel(tenant=tenant, job_uuid=job_uuid)


# ------------------------------------------------------------------ post-training jobs


@router.get("/post_training/jobs", response_description=OK)
def list_jobs(
    tenant: TenantDep,
    jobs: JobsServiceDep,
    status: StatusFilter = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobList:
    """The tenant's post-training jobs, newest first."""
    statuses = [JobStatus(value) for value in status or ()]
    return jobs.list(
        tenant=tenant, kinds=TRAINING_KINDS, statuses=statuses, limit=limit, offset=offset
    )


@router.get("/post_training/job", response_description=OK)
def get_job(job_uuid: Id, tenant: TenantDep, jobs: JobsServiceDep) -> JobSummary:
    return jobs.get(tenant=tenant, job_uuid=job_uuid, kinds=TRAINING_KINDS)


@router.get("/post_training/job/metrics", response_description=OK)
def job_metrics(
    job_uuid: Id,
    tenant: TenantDep,
    jobs: JobsServiceDep,
    after_step: AfterStep = None,
    limit: MetricsLimit = 1000,
) -> JobMetrics:
    """The job's per-step metrics in step order; `next_after_step` pages on."""
    return jobs.metrics(
        tenant=tenant, job_uuid=job_uuid, after_step=after_step, limit=limit, kinds=TRAINING_KINDS
    )


@router.post("/post_training/job/cancel", response_description=OK)
def cancel_job(body: CancelJobRequest, tenant: TenantDep, jobs: JobsServiceDep) -> JobSummary:
    return jobs.cancel(tenant=tenant, job_uuid=body.job_uuid, kinds=TRAINING_KINDS)
