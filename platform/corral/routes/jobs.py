"""Corral's job routes (tag "Corral": not part of the Llama Stack spec): list jobs with a
status filter and pages, read one job's lifecycle and progress, cancel a job. HTTP only;
the PostTrainingService does the work."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from corral.api.common import Id
from corral.api.jobs import CancelJobRequest, JobList, JobStatusName, JobSummary
from corral.deps import PostTrainingServiceDep, TenantDep
from corral.routes.responses import OK
from corral.store.jobs import JobStatus

TAG = "Corral"
router = APIRouter(tags=[TAG])
MAX_PAGE = 500
# Past any real job count, and within every database's integer (SQLite refused 2**63).
MAX_OFFSET = 2**31 - 1


@router.get("/post_training/jobs", response_description=OK)
def list_jobs(
    tenant: TenantDep,
    post_training: PostTrainingServiceDep,
    status: Annotated[list[JobStatusName] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobList:
    """The tenant's jobs, newest first; `status` may be given several times."""
    statuses = [JobStatus(value) for value in status or ()]
    return post_training.list_jobs(tenant=tenant, statuses=statuses, limit=limit, offset=offset)


@router.get("/post_training/job", response_description=OK)
def get_job(job_uuid: Id, tenant: TenantDep, post_training: PostTrainingServiceDep) -> JobSummary:
    return post_training.job(tenant=tenant, job_uuid=job_uuid)


@router.post("/post_training/job/cancel", response_description=OK)
def cancel_job(
    body: CancelJobRequest, tenant: TenantDep, post_training: PostTrainingServiceDep
) -> JobSummary:
    return post_training.cancel(tenant=tenant, job_uuid=body.job_uuid)
