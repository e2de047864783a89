"""Post-training jobs: submission (checked and planned here, then stored and handed to
Ray by the JobsService) and the spec's shapes of a job's status, log lines and
checkpoints (from the SQL store, which the running job writes to). Listing, progress,
metrics and cancellation are every kind's: services/jobs.py."""

from __future__ import annotations

from pathlib import Path

from corral.api.post_training import (
    PostTrainingJobArtifactsResponse,
    PostTrainingJobLogStream,
    PostTrainingJobStatusResponse,
    PostTrainingRLHFRequest,
    PostTrainingSFTRequest,
)
from corral.errors import BackendUnavailable, CapabilityUnavailable
from corral.observability.context import bind_job
from corral.services.fine_tuning import LaunchPlanner
from corral.services.jobs import JobsService, queue_place
from corral.storage import Storage
from corral.store.db import Database
from corral.store.jobs import TRAINING_KINDS, JobKind, JobStatus, JobStore
from corral.store.tables import Checkpoint
from serve_apps.model_cache import is_local


def checkpoint_url(path: str, storage: Storage | None = None) -> str:
    """Checkpoint paths are stored as written by the job; the spec wants a URL: a
    `file://` one for a directory, the client-facing URL of `storage` for a storage URI
    (a presigned `https://` listing for S3)."""
    if path.startswith(("file://", "https://", "http://")):
        return path
    if not is_local(path):
        if storage is None:
            raise BackendUnavailable(f"checkpoint {path[:300]!r} is in storage this server lacks")
        return storage.directory_url(path)
    return Path(path).resolve().as_uri()


def _checkpoint_refs(
    checkpoints: list[Checkpoint], storage: Storage | None
) -> list[dict[str, object]]:
    return [{"iters": c.iters, "path": checkpoint_url(c.path, storage)} for c in checkpoints]


class PostTrainingService:
    def __init__(
        self,
        *,
        database: Database,
        jobs: JobsService,
        planner: LaunchPlanner | None = None,
        storage: Storage | None = None,
    ) -> None:
        """Without a planner (no Ray connection) jobs can be read but not submitted.
        `storage` gives the URLs of checkpoints in object storage."""
        self._db = database
        self._jobs = jobs
        self._planner = planner
        self._storage = storage

    # ------------------------------------------------------------------ submission

    def supervised_fine_tune(self, *, tenant: str, request: PostTrainingSFTRequest) -> None:
        planner = self._checked_planner("post_training.supervised_fine_tune")
        self._jobs.submit(
            tenant=tenant,
            job_uuid=request.job_uuid,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            body=request.model_dump(mode="json"),
            plan=lambda: planner.plan_sft(tenant=tenant, request=request),
        )

    def preference_optimize(self, *, tenant: str, request: PostTrainingRLHFRequest) -> None:
        planner = self._checked_planner("post_training.preference_optimize")
        self._jobs.submit(
            tenant=tenant,
            job_uuid=request.job_uuid,
            kind=JobKind.PREFERENCE_OPTIMIZE,
            body=request.model_dump(mode="json"),
            plan=lambda: planner.plan_dpo(tenant=tenant, request=request),
        )

    def _checked_planner(self, capability: str) -> LaunchPlanner:
        if self._planner is None:
            raise CapabilityUnavailable(capability, "this server has no Ray connection")
        return self._planner

    # ------------------------------------------------------------------ spec reads

    def status(self, *, tenant: str, job_uuid: str) -> PostTrainingJobStatusResponse:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant, kinds=TRAINING_KINDS)
            bind_job(job_uuid=job.uuid, job_key=job.key)
            body: dict[str, object] = {
                "job_uuid": job.uuid,
                "status": JobStatus(job.status).spec_value,
                "scheduled_at": job.scheduled_at,
                "checkpoints": _checkpoint_refs(store.checkpoints(job.key), self._storage),
            }
            if job.started_at is not None:
                body["started_at"] = job.started_at
            if job.completed_at is not None:
                body["completed_at"] = job.completed_at
            if job.resources_allocated is not None:
                body["resources_allocated"] = job.resources_allocated
            elif (queued := queue_place(job))["queue_reason"] is not None:
                # The spec's one free-form field: while the job is queued, why it waits.
                body["resources_allocated"] = {"need": job.need, **queued}
            return PostTrainingJobStatusResponse.model_validate(body)

    def logs(self, *, tenant: str, job_uuid: str) -> PostTrainingJobLogStream:
        logs = self._jobs.logs(tenant=tenant, job_uuid=job_uuid, kinds=TRAINING_KINDS)
        return PostTrainingJobLogStream(job_uuid=logs.job_uuid, log_lines=logs.log_lines)

    def artifacts(self, *, tenant: str, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant, kinds=TRAINING_KINDS)
            bind_job(job_uuid=job.uuid, job_key=job.key)
            return PostTrainingJobArtifactsResponse.model_validate(
                {
                    "job_uuid": job.uuid,
                    "checkpoints": _checkpoint_refs(store.checkpoints(job.key), self._storage),
                }
            )
