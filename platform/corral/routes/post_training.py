"""Post-training routes: HTTP only; the PostTrainingService does the work."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from corral.api.common import Id
from corral.api.post_training import (
    PostTrainingJobArtifactsResponse,
    PostTrainingJobLogStream,
    PostTrainingJobStatusResponse,
    PostTrainingRLHFRequest,
    PostTrainingSFTRequest,
)
from corral.deps import PostTrainingServiceDep, TenantDep
from corral.routes.responses import OK, empty_ok

router = APIRouter(tags=["PostTraining"])


# The spec spells both submission paths with a trailing slash.
@router.post(
    "/post_training/supervised_fine_tune/", response_class=Response, response_description=OK
)
def supervised_fine_tune(
    body: PostTrainingSFTRequest, tenant: TenantDep, post_training: PostTrainingServiceDep
) -> Response:
    post_training.supervised_fine_tune(tenant=tenant, request=body)
    return empty_ok()


@router.post(
    "/post_training/preference_optimize/", response_class=Response, response_description=OK
)
def preference_optimize(
    body: PostTrainingRLHFRequest, tenant: TenantDep, post_training: PostTrainingServiceDep
) -> Response:
    post_training.preference_optimize(tenant=tenant, request=body)
    return empty_ok()


@router.get("/post_training/job/status", response_description=OK, response_model_exclude_none=True)
def job_status(
    job_uuid: Id, tenant: TenantDep, post_training: PostTrainingServiceDep
) -> PostTrainingJobStatusResponse:
    return post_training.status(tenant=tenant, job_uuid=job_uuid)


@router.get("/post_training/job/logs", response_description=OK, response_model_exclude_none=True)
def job_logs(
    job_uuid: Id, tenant: TenantDep, post_training: PostTrainingServiceDep
) -> PostTrainingJobLogStream:
    return post_training.logs(tenant=tenant, job_uuid=job_uuid)


@router.get(
    "/post_training/job/artifacts", response_description=OK, response_model_exclude_none=True
)
def job_artifacts(
    job_uuid: Id, tenant: TenantDep, post_training: PostTrainingServiceDep
) -> PostTrainingJobArtifactsResponse:
    return post_training.artifacts(tenant=tenant, job_uuid=job_uuid)
