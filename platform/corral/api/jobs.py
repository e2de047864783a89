"""Corral's own view of post-training jobs (not part of the Llama Stack spec): listing with
a status filter, one job's lifecycle and progress, and cancellation."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from corral.api.common import Id

JobStatusName = Literal["scheduled", "running", "completed", "failed", "cancelled"]
JobKindName = Literal["supervised_fine_tune", "preference_optimize", "synthetic_data_generation"]


class JobProgress(BaseModel):
    """How far training got: the last optimizer step logged, out of the planned total."""

    step: int
    total_steps: int | None = None
    loss: float | None = None


class JobSummary(BaseModel):
    """A job as Corral stores it. Unlike the spec's status, `status` tells `cancelled`
    from `failed`, and `error` says why a job did not complete."""

    job_uuid: str
    kind: JobKindName
    status: JobStatusName
    scheduled_at: AwareDatetime
    started_at: AwareDatetime | None = None
    completed_at: AwareDatetime | None = None
    error: str | None = None
    attempt: int
    checkpoints: int
    progress: JobProgress | None = None
    # Cancelled, but Ray has not yet confirmed that the job's Ray job ended (e.g. Ray
    # could not be reached when it was cancelled): the reconciler stops it.
    stop_pending: bool = False


class JobList(BaseModel):
    data: list[JobSummary]
    # Pass as `offset` for the next page; absent on the last page.
    next_offset: int | None = None


class CancelJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_uuid: Id
