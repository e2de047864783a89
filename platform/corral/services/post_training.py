"""Post-training jobs: submission (checked up front, stored, then handed to Ray), status,
log lines and checkpoints (from the SQL store, which the running job writes to), and
Corral's own listing and cancellation."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from corral.api.jobs import JobList, JobProgress, JobSummary
from corral.api.post_training import (
    PostTrainingJobArtifactsResponse,
    PostTrainingJobLogStream,
    PostTrainingJobStatusResponse,
    PostTrainingRLHFRequest,
    PostTrainingSFTRequest,
)
from corral.errors import BackendUnavailable, CapabilityUnavailable, Conflict
from corral.ray_jobs import JobLauncher
from corral.services.fine_tuning import LaunchPlanner
from corral.services.ids import check_id
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.store.tables import Checkpoint, Job, JobLogLine
from jobs.reporting import PLAN_PREFIX, STEP_PREFIX, read_progress

log = logging.getLogger(__name__)


def checkpoint_url(path: str) -> str:
    """Checkpoint paths are stored as written by the job; the spec wants a URL."""
    if path.startswith(("file://", "https://", "http://")):
        return path
    return Path(path).resolve().as_uri()


def _checkpoint_refs(checkpoints: list[Checkpoint]) -> list[dict[str, object]]:
    return [{"iters": c.iters, "path": checkpoint_url(c.path)} for c in checkpoints]


class PostTrainingService:
    def __init__(
        self,
        *,
        database: Database,
        planner: LaunchPlanner | None = None,
        launcher: JobLauncher | None = None,
    ) -> None:
        """Without a planner and launcher (no Ray connection) jobs can be read but not
        submitted."""
        self._db = database
        self._planner = planner
        self._launcher = launcher

    # ------------------------------------------------------------------ submission

    def supervised_fine_tune(self, *, tenant: str, request: PostTrainingSFTRequest) -> None:
        planner, _ = self._runner("post_training.supervised_fine_tune")
        self._submit(
            tenant=tenant,
            job_uuid=request.job_uuid,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            body=request.model_dump(mode="json"),
            plan=lambda: planner.plan_sft(tenant=tenant, request=request),
        )

    def preference_optimize(self, *, tenant: str, request: PostTrainingRLHFRequest) -> None:
        planner, _ = self._runner("post_training.preference_optimize")
        self._submit(
            tenant=tenant,
            job_uuid=request.job_uuid,
            kind=JobKind.PREFERENCE_OPTIMIZE,
            body=request.model_dump(mode="json"),
            plan=lambda: planner.plan_dpo(tenant=tenant, request=request),
        )

    def _runner(self, capability: str) -> tuple[LaunchPlanner, JobLauncher]:
        if self._planner is None or self._launcher is None:
            raise CapabilityUnavailable(capability, "this server has no Ray connection")
        return self._planner, self._launcher

    def _submit(
        self,
        *,
        tenant: str,
        job_uuid: str,
        kind: JobKind,
        body: dict[str, Any],
        plan: Callable[[], dict[str, Any]],
    ) -> None:
        """Store a scheduled job and hand it to Ray. The same request again changes
        nothing; the same uuid with another request is a Conflict. Nothing is stored
        unless the whole request checks out."""
        _, launcher = self._runner(kind.value)
        check_id(job_uuid, what="job_uuid")
        with self._db.transaction() as session:
            found = JobStore(session).same_request(
                tenant=tenant, job_uuid=job_uuid, kind=kind, request=body
            )
            if found is not None:
                return  # the same request again: nothing to do
        launch = plan()  # datasets are fetched here, outside any transaction
        with self._db.transaction() as session:
            created = JobStore(session).create(
                job_uuid=job_uuid, tenant=tenant, kind=kind, request=body, launch=launch
            )
            key = created.job.key
        if not created.created:
            return  # a concurrent submission of the same request stored it first
        try:
            launcher.submit(key)
        except BackendUnavailable as exc:
            # The row is stored and scheduled: the reconciler submits it once Ray answers.
            log.warning("job %s stored but not yet submitted: %s", key, exc)
            with self._db.transaction() as session:
                JobStore(session).append_log(key, f"waiting for Ray: {exc.message}")

    # ------------------------------------------------------------------ Corral's own

    def list_jobs(
        self, *, tenant: str, statuses: Sequence[JobStatus] = (), limit: int, offset: int
    ) -> JobList:
        with self._db.transaction() as session:
            jobs = JobStore(session).find(
                tenant=tenant, statuses=statuses, limit=limit + 1, offset=offset
            )
            counts = _checkpoint_counts(session, [job.key for job in jobs[:limit]])
            summaries = [_summary(job, counts.get(job.key, 0)) for job in jobs[:limit]]
        return JobList(data=summaries, next_offset=offset + limit if len(jobs) > limit else None)

    def job(self, *, tenant: str, job_uuid: str) -> JobSummary:
        with self._db.transaction() as session:
            job = JobStore(session).get(job_uuid, tenant=tenant)
            counts = _checkpoint_counts(session, [job.key])
            return _summary(job, counts.get(job.key, 0), progress=_progress(session, job.key))

    def cancel(self, *, tenant: str, job_uuid: str) -> JobSummary:
        """Record the cancellation first (so a late completion cannot overwrite it), with a
        pending stop, then stop the Ray job, which frees its workers. The cancellation
        holds once recorded: if Ray cannot be reached now, the answer still says
        `cancelled`, with `stop_pending` true, and the reconciler stops the Ray job when
        Ray answers again. Cancelling a cancelled job only asks Ray to stop again; a job
        that already completed or failed is a Conflict."""
        with self._db.transaction() as session:
            store = JobStore(session)
            key = store.get(job_uuid, tenant=tenant).key  # NotFound for another tenant's
            outcome = store.transition(key, to=JobStatus.CANCELLED, error="cancelled")
            if outcome.applied:
                store.set_stop_pending(key, True)
                store.append_log(key, "cancelled on request")
        if not outcome.applied and outcome.status is not JobStatus.CANCELLED:
            raise Conflict(f"job {job_uuid!r} already {outcome.status.value}; nothing to cancel")
        if self._launcher is not None:
            try:
                self._launcher.stop(key)
            except BackendUnavailable as exc:
                log.warning("job %s cancelled; its Ray job is stopped later: %s", key, exc)
                with self._db.transaction() as session:
                    JobStore(session).append_log(
                        key,
                        f"Ray could not be reached to stop the job ({exc.message}); "
                        "it is stopped once Ray answers",
                    )
        return self.job(tenant=tenant, job_uuid=job_uuid)

    # ------------------------------------------------------------------ spec reads

    def status(self, *, tenant: str, job_uuid: str) -> PostTrainingJobStatusResponse:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant)
            body: dict[str, object] = {
                "job_uuid": job.uuid,
                "status": JobStatus(job.status).spec_value,
                "scheduled_at": job.scheduled_at,
                "checkpoints": _checkpoint_refs(store.checkpoints(job.key)),
            }
            if job.started_at is not None:
                body["started_at"] = job.started_at
            if job.completed_at is not None:
                body["completed_at"] = job.completed_at
            if job.resources_allocated is not None:
                body["resources_allocated"] = job.resources_allocated
            return PostTrainingJobStatusResponse.model_validate(body)

    def logs(self, *, tenant: str, job_uuid: str) -> PostTrainingJobLogStream:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant)
            lines = [line.line for line in store.log_lines(job.key)]
            return PostTrainingJobLogStream(job_uuid=job.uuid, log_lines=lines)

    def artifacts(self, *, tenant: str, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant)
            return PostTrainingJobArtifactsResponse.model_validate(
                {"job_uuid": job.uuid, "checkpoints": _checkpoint_refs(store.checkpoints(job.key))}
            )


def _summary(job: Job, checkpoints: int, *, progress: JobProgress | None = None) -> JobSummary:
    return JobSummary.model_validate(
        {
            "job_uuid": job.uuid,
            "kind": job.kind,
            "status": job.status,
            "scheduled_at": job.scheduled_at,
            "started_at": job.started_at,
            "completed_at": job.completed_at,
            "error": job.error,
            "attempt": job.attempt,
            "stop_pending": job.stop_pending,
            "checkpoints": checkpoints,
            "progress": progress,
        }
    )


def _checkpoint_counts(session: Session, job_keys: list[str]) -> dict[str, int]:
    if not job_keys:
        return {}
    query = (
        select(Checkpoint.job_key, func.count())
        .where(Checkpoint.job_key.in_(job_keys))
        .group_by(Checkpoint.job_key)
    )
    return {key: count for key, count in session.execute(query).tuples()}


def _last_line(session: Session, job_key: str, prefix: str) -> str | None:
    query = (
        select(JobLogLine.line)
        .where(JobLogLine.job_key == job_key, JobLogLine.line.startswith(prefix))
        .order_by(JobLogLine.id.desc())
        .limit(1)
    )
    return session.scalar(query)


def _progress(session: Session, job_key: str) -> JobProgress | None:
    progress = read_progress(
        plan_line=_last_line(session, job_key, PLAN_PREFIX),
        step_line=_last_line(session, job_key, STEP_PREFIX),
    )
    if progress is None:
        return None
    return JobProgress(step=progress.step, total_steps=progress.total_steps, loss=progress.loss)
