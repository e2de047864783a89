"""Corral's own view of jobs of every kind (not part of the Llama Stack spec): listing with
kind and status filters, one job's lifecycle and progress, its log lines, its per-step
metrics, and cancellation."""

from __future__ import annotations

from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from corral.api.common import Id

JobStatusName = Literal["scheduled", "running", "completed", "failed", "cancelled"]
JobKindName = Literal["supervised_fine_tune", "preference_optimize", "synthetic_data_generation"]


class JobProgress(BaseModel):
    """How far the job got: the step it recorded last, out of the planned total, and that
    step's loss (from its metrics)."""

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
    # Where the job writes TensorBoard event files, when its `logger_config` asked for
    # them (`{"tensorboard": true}`): `tensorboard --logdir` on that directory.
    tensorboard_url: str | None = None
    # Admission (docs/admission.md): what the job holds on the cluster while it runs (Ray
    # resource name -> amount), and when it was handed to Ray. A `scheduled` job not yet
    # admitted is queued: its place in the queue (1: next; null until an admission pass
    # has placed it) and why it waits, e.g. "waiting for 2 GPU; 1 free".
    need: dict[str, float] | None = None
    admitted_at: AwareDatetime | None = None
    queue_position: int | None = None
    queue_reason: str | None = None


class JobList(BaseModel):
    data: list[JobSummary]
    # Pass as `offset` for the next page; absent on the last page.
    next_offset: int | None = None


class CancelJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_uuid: Id


class JobLogs(BaseModel):
    job_uuid: str
    log_lines: list[str]


class JobMetric(BaseModel):
    """What the job measured at one step (epoch 0: before training), e.g. `loss`,
    `learning_rate`, `tokens_per_second`, `validation_loss`; DPO adds `reward_accuracy`,
    `reward_margin`, `chosen_reward` and `rejected_reward` (and their `validation_`s)."""

    step: int
    epoch: int | None
    recorded_at: AwareDatetime
    values: dict[str, float]


class JobMetrics(BaseModel):
    job_uuid: str
    data: list[JobMetric]
    # Pass as `after_step` for the next page; null on the last page.
    next_after_step: int | None
