"""The bodies of the internal job routes (`/internal/jobs/{job_key}/...`, not in the
OpenAPI document): what a running job sends about itself and reads back, each field
bounded so that a job token cannot make the server store or read without limit. The
job's side (`jobs.transport.HttpTransport`) sends these same models, and
`jobs.reporting.JobReporter` cuts text to the limits before it sends anything."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# The largest body an internal route reads at all (413 beyond): a full page of log lines.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_LINE_CHARS = 8192
MAX_LINES_PER_CALL = 512
MAX_ERROR_CHARS = 8192
MAX_METRIC_NAME_CHARS = 100
MAX_METRICS_PER_CALL = 64
MAX_PATH_CHARS = 4096
MAX_STEP = 2**31 - 1
MAX_JOB_KEY_CHARS = 192  # corral.store.tables.JOB_KEY_LENGTH


def _storable(text: str) -> str:
    """Text every database stores: no NUL (PostgreSQL refuses it) and no lone surrogate
    (not UTF-8). The job's reporter replaces both before it sends."""
    if "\x00" in text:
        raise ValueError("text must not contain NUL")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return text


Storable = AfterValidator(_storable)
LineText = Annotated[str, StringConstraints(max_length=MAX_LINE_CHARS), Storable]
ErrorText = Annotated[str, StringConstraints(max_length=MAX_ERROR_CHARS), Storable]
DetailText = Annotated[str, StringConstraints(max_length=1000), Storable]
ScalarText = Annotated[str, StringConstraints(max_length=500), Storable]
PathText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATH_CHARS), Storable]
MetricName = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=MAX_METRIC_NAME_CHARS, pattern=r"^[A-Za-z0-9_.:/-]+$"
    ),
]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Scalar = ScalarText | int | FiniteFloat | bool | None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransitionBody(_Body):
    """A lifecycle move the job makes itself: it starts, completes or fails. It goes
    through the same transition function as every other move, so a job that was
    cancelled meanwhile cannot mark itself completed."""

    to: Literal["running", "completed", "failed"]
    error: ErrorText | None = None
    resources_allocated: dict[MetricName, Scalar] | None = Field(default=None, max_length=32)


class TransitionAnswer(_Body):
    applied: bool
    status: Literal["scheduled", "running", "completed", "failed", "cancelled"]
    refused: Literal["illegal", "stale"] | None = None


class LogBody(_Body):
    lines: list[LineText] = Field(min_length=1, max_length=MAX_LINES_PER_CALL)


class PlanBody(_Body):
    total_steps: int = Field(ge=0, le=MAX_STEP)
    detail: DetailText = ""


class MetricsBody(_Body):
    step: int = Field(ge=0, le=MAX_STEP)
    epoch: int | None = Field(default=None, ge=0, le=MAX_STEP)
    values: dict[MetricName, FiniteFloat] = Field(max_length=MAX_METRICS_PER_CALL)


class CheckpointBody(_Body):
    iters: int = Field(ge=0, le=MAX_STEP)
    path: PathText
    metrics: dict[MetricName, FiniteFloat] | None = Field(
        default=None, max_length=MAX_METRICS_PER_CALL
    )


class CheckpointEntry(_Body):
    iters: int
    path: str


class CheckpointList(_Body):
    checkpoints: list[CheckpointEntry]


class StatusAnswer(_Body):
    status: Literal["scheduled", "running", "completed", "failed", "cancelled"]
    attempt: int


class LaunchAnswer(_Body):
    """What the job runs: its kind, attempt and stored launch config, and where it writes
    TensorBoard files if its request asked for them (jobs/logger_config.py)."""

    kind: Literal["supervised_fine_tune", "preference_optimize", "synthetic_data_generation"]
    attempt: int
    launch: dict[str, Any]
    tensorboard_dir: str | None = None


class DatasetBody(_Body):
    """A generation job's end: the dataset it wrote (in its own directory, where the
    server finds it: `data.jsonl`), registered for its tenant in the same transaction
    that completes the job."""

    row_count: int = Field(ge=1, le=MAX_STEP)
    content_sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
