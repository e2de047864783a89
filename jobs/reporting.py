"""How a running job tells the store what it is doing. The store is the truth, so a
job reports through the same transition function as everyone else: a job that was
cancelled while it ran cannot mark itself completed afterwards.

The job contract: lifecycle moves, log lines (for people), checkpoints, the planned
number of steps and per-step metrics (data: what progress and the metrics routes read).
They travel over a `JobTransport` (jobs/transport.py): the API's internal routes with
the job's own token for every job Ray runs, the store itself for a recipe run
in-process. A job whose `logger_config` asks for TensorBoard (jobs/logger_config.py)
gets its metrics written as TensorBoard event files as well."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.api.internal_jobs import MAX_ERROR_CHARS, MAX_LINE_CHARS, MAX_LINES_PER_CALL
from corral.services.job_reports import JobState
from corral.store.jobs import JobStatus, TransitionOutcome
from jobs.report_target import ReportTarget
from jobs.transport import JobTransport, open_transport

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


class JobReporter:
    """Writes one job's lifecycle, log lines and checkpoints, each call on its own (its
    own transaction in the store), so that what was reported survives a crash a moment
    later. Text longer than the internal routes take is cut to fit, never refused."""

    def __init__(self, transport: JobTransport) -> None:
        self.transport = transport
        self.job_key = transport.job_key
        # Opened on the first metrics, where the job's row asks for TensorBoard.
        self._tensorboard: SummaryWriter | None = None
        self._tensorboard_checked = False

    @classmethod
    def open(cls, target: ReportTarget | None, job_key: str) -> JobReporter:
        """A reporter for `job_key` over the transport `target` names (a recipe's
        `report_to`); `close` it when done."""
        if target is None:
            raise ValueError(f"job {job_key}: its config names nowhere to report (report_to)")
        return cls(open_transport(target, job_key))

    def _move(self, to: JobStatus, **fields: Any) -> TransitionOutcome:
        outcome = self.transport.transition(to, **fields)
        if not outcome.applied:
            log.warning(
                "job %s: %s -> %s refused (%s)", self.job_key, outcome.status, to, outcome.refused
            )
        return outcome

    def started(self, *, resources_allocated: dict[str, Any]) -> TransitionOutcome:
        return self._move(JobStatus.RUNNING, resources_allocated=resources_allocated)

    def completed(self) -> TransitionOutcome:
        return self._move(JobStatus.COMPLETED)

    def failed(self, error: str) -> TransitionOutcome:
        error = _cut(error, MAX_ERROR_CHARS)
        self.log(f"failed: {error}")
        return self._move(JobStatus.FAILED, error=error)

    def completed_with_dataset(self, *, row_count: int, content_sha256: str) -> TransitionOutcome:
        """A generation job's end: its dataset registered and the job completed, both or
        neither (corral.services.job_reports)."""
        outcome = self.transport.complete_with_dataset(
            row_count=row_count, content_sha256=content_sha256
        )
        if not outcome.applied:
            log.warning("job %s: completion refused: it is %s", self.job_key, outcome.status)
        return outcome

    def plan(self, *, total_steps: int, detail: str = "") -> None:
        """The number of optimizer steps this run will take (what progress counts to)."""
        self.transport.plan(total_steps=total_steps, detail=_cut(detail, 900))

    def metrics(self, *, step: int, epoch: int | None = None, **values: float) -> None:
        """What the job measured at `step` (of `epoch`; 0 is before training): e.g. loss,
        learning_rate, tokens_per_second, validation_loss. Figures of one step may come in
        several calls. A figure that is not a finite number (a diverged loss) is left out:
        JSON has no NaN, and the step's log line still shows it."""
        finite = _finite(values)
        self.transport.metrics(step=step, epoch=epoch, values=finite)
        writer = self._tensorboard_writer()
        if writer is not None:
            for name, value in finite.items():
                writer.add_scalar(name, value, global_step=step)
            writer.flush()  # readable at once, and nothing lost if the worker dies

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened, and the transport."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self.transport.close()

    def _tensorboard_writer(self) -> SummaryWriter | None:
        if not self._tensorboard_checked:
            self._tensorboard_checked = True
            directory = self.transport.launch().tensorboard_dir
            if directory is not None:
                self._tensorboard = _open_writer(Path(directory))
        return self._tensorboard

    def log(self, *lines: str) -> None:
        cut = [_cut(line, MAX_LINE_CHARS) for line in lines]
        for start in range(0, len(cut), MAX_LINES_PER_CALL):
            self.transport.log(cut[start : start + MAX_LINES_PER_CALL])

    def checkpoint(self, *, iters: int, path: str, metrics: dict[str, Any] | None = None) -> None:
        figures = _finite(metrics) if metrics is not None else None
        self.transport.checkpoint(iters=iters, path=path, metrics=figures)

    def status(self) -> JobStatus | None:
        state = self.transport.state()
        return state.status if state is not None else None

    def state(self) -> JobState | None:
        return self.transport.state()

    def last_checkpoint_path(self) -> str | None:
        checkpoints = self.transport.checkpoints()
        return max(checkpoints, key=lambda c: c.iters).path if checkpoints else None


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    finite: dict[str, float] = {}
    for name, value in values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            finite[name] = number
    return finite


def _cut(text: str, limit: int) -> str:
    """`text` as the internal routes take it: storable (NUL and lone surrogates replaced)
    and at most `limit` characters."""
    text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _open_writer(directory: Path) -> SummaryWriter:
    # torch (and TensorBoard under it) only where a job asked for event files.
    from torch.utils.tensorboard import SummaryWriter

    directory.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(directory))
