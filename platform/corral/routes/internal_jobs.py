"""The routes a running job reports through: `/internal/jobs/{job_key}/...`, not in the
OpenAPI document and not for clients. HTTP only; `corral.services.job_reports` does the
work.

Each call carries the job's own token (`Authorization: Bearer cjt1...`,
corral.job_tokens), checked against the key in its path before anything else is read:
a job's token opens its own job's routes and nothing else, and an API key opens none of
these (the auth middleware lets `/internal/` through to this check alone, and job tokens
are not API keys on any other route). Bodies are read only after the token is checked,
bounded in size (413) and validated by the models of `corral.api.internal_jobs` (422).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar, cast

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from corral.api.internal_jobs import (
    MAX_BODY_BYTES,
    MAX_JOB_KEY_CHARS,
    CheckpointBody,
    CheckpointEntry,
    CheckpointList,
    DatasetBody,
    LaunchAnswer,
    LogBody,
    MetricsBody,
    PlanBody,
    StatusAnswer,
    TransitionAnswer,
    TransitionBody,
)
from corral.errors import ContentTooLarge, Unauthorized
from corral.job_tokens import JobTokens
from corral.services.container import Services
from corral.services.job_reports import JobReports
from corral.store.jobs import JobStatus, TransitionOutcome

PREFIX = "/internal/jobs"
router = APIRouter(prefix=PREFIX, include_in_schema=False)
Body = TypeVar("Body", bound=BaseModel)


def _job_key(
    request: Request, job_key: Annotated[str, Path(min_length=1, max_length=MAX_JOB_KEY_CHARS)]
) -> str:
    """The path's job key, once the request's token is shown to be that job's."""
    tokens = cast(JobTokens, request.app.state.job_tokens)
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not tokens.verify(job_key, token.strip()):
        raise Unauthorized("a valid job token for this job is required")
    return job_key


JobKeyDep = Annotated[str, Depends(_job_key)]


def _reports(request: Request) -> JobReports:
    return cast(Services, request.app.state.services).job_reports


ReportsDep = Annotated[JobReports, Depends(_reports)]


def _body_of(model: type[Body]) -> Callable[..., Awaitable[Body]]:
    """A dependency that reads and validates the body as `model`, after the token."""

    async def read(request: Request, _key: JobKeyDep) -> Body:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise ContentTooLarge(f"a job report body is at most {MAX_BODY_BYTES} bytes")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise ContentTooLarge(f"a job report body is at most {MAX_BODY_BYTES} bytes")
        try:
            return model.model_validate_json(bytes(data))
        except ValidationError as exc:
            raise RequestValidationError(
                [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
            ) from None

    return read


def _answer(outcome: TransitionOutcome) -> TransitionAnswer:
    return TransitionAnswer(
        applied=outcome.applied, status=outcome.status.value, refused=outcome.refused
    )


@router.get("/{job_key}/launch")
def launch(key: JobKeyDep, reports: ReportsDep) -> LaunchAnswer:
    found = reports.launch(key)
    return LaunchAnswer(
        kind=found.kind.value,
        attempt=found.attempt,
        launch=found.launch,
        tensorboard_dir=found.tensorboard_dir,
    )


@router.get("/{job_key}/status")
def status(key: JobKeyDep, reports: ReportsDep) -> StatusAnswer:
    state = reports.state(key)
    return StatusAnswer(status=state.status.value, attempt=state.attempt)


@router.post("/{job_key}/transition")
def transition(
    key: JobKeyDep,
    reports: ReportsDep,
    body: Annotated[TransitionBody, Depends(_body_of(TransitionBody))],
) -> TransitionAnswer:
    resources = dict(body.resources_allocated) if body.resources_allocated is not None else None
    return _answer(
        reports.transition(
            key, to=JobStatus(body.to), error=body.error, resources_allocated=resources
        )
    )


@router.post("/{job_key}/logs", status_code=204)
def logs(
    key: JobKeyDep, reports: ReportsDep, body: Annotated[LogBody, Depends(_body_of(LogBody))]
) -> Response:
    reports.log(key, *body.lines)
    return Response(status_code=204)


@router.post("/{job_key}/plan", status_code=204)
def plan(
    key: JobKeyDep, reports: ReportsDep, body: Annotated[PlanBody, Depends(_body_of(PlanBody))]
) -> Response:
    reports.plan(key, total_steps=body.total_steps, detail=body.detail)
    return Response(status_code=204)


@router.post("/{job_key}/metrics", status_code=204)
def metrics(
    key: JobKeyDep,
    reports: ReportsDep,
    body: Annotated[MetricsBody, Depends(_body_of(MetricsBody))],
) -> Response:
    reports.metrics(key, step=body.step, epoch=body.epoch, values=dict(body.values))
    return Response(status_code=204)


@router.post("/{job_key}/checkpoints", status_code=204)
def add_checkpoint(
    key: JobKeyDep,
    reports: ReportsDep,
    body: Annotated[CheckpointBody, Depends(_body_of(CheckpointBody))],
) -> Response:
    figures = dict(body.metrics) if body.metrics is not None else None
    reports.checkpoint(key, iters=body.iters, path=body.path, metrics=figures)
    return Response(status_code=204)


@router.get("/{job_key}/checkpoints")
def list_checkpoints(key: JobKeyDep, reports: ReportsDep) -> CheckpointList:
    return CheckpointList(
        checkpoints=[CheckpointEntry(iters=c.iters, path=c.path) for c in reports.checkpoints(key)]
    )


@router.post("/{job_key}/dataset")
def complete_with_dataset(
    key: JobKeyDep,
    reports: ReportsDep,
    body: Annotated[DatasetBody, Depends(_body_of(DatasetBody))],
) -> TransitionAnswer:
    return _answer(
        reports.complete_with_dataset(
            key, row_count=body.row_count, content_sha256=body.content_sha256
        )
    )
