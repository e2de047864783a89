"""Post-training jobs as the spec shows them: status, log lines and checkpoints come
from the SQL store, which the running job writes to."""

from __future__ import annotations

from pathlib import Path

from corral.api.post_training import (
    PostTrainingJobArtifactsResponse,
    PostTrainingJobLogStream,
    PostTrainingJobStatusResponse,
    PostTrainingRLHFRequest,
    PostTrainingSFTRequest,
)
from corral.errors import CapabilityUnavailable
from corral.store.db import Database
from corral.store.jobs import JobStatus, JobStore
from corral.store.tables import Checkpoint


def checkpoint_url(path: str) -> str:
    """Checkpoint paths are stored as written by the job; the spec wants a URL."""
    if path.startswith(("file://", "https://", "http://")):
        return path
    return Path(path).resolve().as_uri()


def _checkpoint_refs(checkpoints: list[Checkpoint]) -> list[dict[str, object]]:
    return [{"iters": c.iters, "path": checkpoint_url(c.path)} for c in checkpoints]


class PostTrainingService:
    def __init__(self, *, database: Database) -> None:
        self._db = database

    def supervised_fine_tune(self, *, tenant: str, request: PostTrainingSFTRequest) -> None:
        raise CapabilityUnavailable(
            "post_training.supervised_fine_tune",
            "the Ray Train fine-tuning runner is not part of this build yet",
        )

    def preference_optimize(self, *, tenant: str, request: PostTrainingRLHFRequest) -> None:
        raise CapabilityUnavailable(
            "post_training.preference_optimize",
            "the Ray Train DPO runner is not part of this build yet",
        )

    def status(self, *, tenant: str, job_uuid: str) -> PostTrainingJobStatusResponse:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant)
            body: dict[str, object] = {
                "job_uuid": job.uuid,
                "status": JobStatus(job.status).spec_value,
                "scheduled_at": job.scheduled_at,
                "checkpoints": _checkpoint_refs(store.checkpoints(job.uuid)),
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
            lines = [line.line for line in store.log_lines(job.uuid)]
            return PostTrainingJobLogStream(job_uuid=job.uuid, log_lines=lines)

    def artifacts(self, *, tenant: str, job_uuid: str) -> PostTrainingJobArtifactsResponse:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant)
            return PostTrainingJobArtifactsResponse.model_validate(
                {"job_uuid": job.uuid, "checkpoints": _checkpoint_refs(store.checkpoints(job.uuid))}
            )
