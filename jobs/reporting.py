"""How a running job tells the SQL store what it is doing. The store is the truth, so a
job reports through the same transition function as everyone else: a job that was
cancelled while it ran cannot mark itself completed afterwards.

The job contract: lifecycle moves, log lines (for people), checkpoints, the planned
number of steps and per-step metrics (data: what progress and the metrics routes read).
A job whose `logger_config` asks for TensorBoard (jobs/logger_config.py) gets its metrics
written as TensorBoard event files as well."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from corral.store.db import Database
from corral.store.jobs import JobStatus, JobStore, TransitionOutcome
from jobs.logger_config import tensorboard_dir

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)


class JobReporter:
    """Writes one job's lifecycle, log lines and checkpoints, each in its own transaction
    so that what was reported survives a crash a moment later."""

    def __init__(self, database: Database, job_key: str) -> None:
        """`job_key` is the job's key (`Job.key`), the name it was launched under."""
        self._db = database
        self.job_key = job_key
        # Opened on the first metrics, where the job's row asks for TensorBoard.
        self._tensorboard: SummaryWriter | None = None
        self._tensorboard_checked = False

    def _move(self, to: JobStatus, **fields: Any) -> TransitionOutcome:
        with self._db.transaction() as session:
            outcome = JobStore(session).transition(self.job_key, to=to, **fields)
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
        self.log(f"failed: {error}")
        return self._move(JobStatus.FAILED, error=error)

    def plan(self, *, total_steps: int, detail: str = "") -> None:
        """The number of optimizer steps this run will take (what progress counts to)."""
        with self._db.transaction() as session:
            store = JobStore(session)
            store.set_total_steps(self.job_key, total_steps)
            store.append_log(
                self.job_key, f"plan: {total_steps} steps" + (f" ({detail})" if detail else "")
            )

    def metrics(self, *, step: int, epoch: int | None = None, **values: float) -> None:
        """What the job measured at `step` (of `epoch`; 0 is before training): e.g. loss,
        learning_rate, tokens_per_second, validation_loss. Figures of one step may come in
        several calls. A figure that is not a finite number (a diverged loss) is left out:
        JSON has no NaN, and the step's log line still shows it."""
        finite = {name: float(value) for name, value in values.items() if math.isfinite(value)}
        with self._db.transaction() as session:
            JobStore(session).record_metrics(self.job_key, step=step, epoch=epoch, values=finite)
        writer = self._tensorboard_writer()
        if writer is not None:
            for name, value in finite.items():
                writer.add_scalar(name, value, global_step=step)
            writer.flush()  # readable at once, and nothing lost if the worker dies

    def close(self) -> None:
        """Close the TensorBoard writer, if one was opened."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def _tensorboard_writer(self) -> SummaryWriter | None:
        if not self._tensorboard_checked:
            self._tensorboard_checked = True
            with self._db.transaction() as session:
                directory = tensorboard_dir(JobStore(session).by_key(self.job_key))
            if directory is not None:
                self._tensorboard = _open_writer(directory)
        return self._tensorboard

    def log(self, *lines: str) -> None:
        with self._db.transaction() as session:
            JobStore(session).append_log(self.job_key, *lines)

    def checkpoint(self, *, iters: int, path: str, metrics: dict[str, Any] | None = None) -> None:
        with self._db.transaction() as session:
            JobStore(session).add_checkpoint(self.job_key, iters=iters, path=path, metrics=metrics)

    def status(self) -> JobStatus | None:
        with self._db.transaction() as session:
            return JobStore(session).status_of(self.job_key)


def _open_writer(directory: Path) -> SummaryWriter:
    # torch (and TensorBoard under it) only where a job asked for event files.
    from torch.utils.tensorboard import SummaryWriter

    directory.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(directory))
