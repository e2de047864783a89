"""How a running job tells the SQL store what it is doing. The store is the truth, so a
job reports through the same transition function as everyone else: a job that was
cancelled while it ran cannot mark itself completed afterwards."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from corral.store.db import Database
from corral.store.jobs import JobStatus, JobStore, TransitionOutcome

log = logging.getLogger(__name__)

# The two log line shapes that progress is read back from (`read_progress`).
PLAN_PREFIX = "plan: "
STEP_PREFIX = "step "
_PLAN = re.compile(r"plan: (\d+) steps")
_STEP = re.compile(r"step (\d+) loss (\S+)")


@dataclass(frozen=True)
class Progress:
    step: int
    total_steps: int | None
    loss: float | None


def read_progress(*, plan_line: str | None, step_line: str | None) -> Progress | None:
    """Progress from the job's last plan line and last step line (either may be None)."""
    plan = _PLAN.match(plan_line) if plan_line else None
    step = _STEP.match(step_line) if step_line else None
    if plan is None and step is None:
        return None
    loss = None
    if step is not None:
        try:
            loss = float(step.group(2))
        except ValueError:
            loss = None
    return Progress(
        step=int(step.group(1)) if step else 0,
        total_steps=int(plan.group(1)) if plan else None,
        loss=loss,
    )


class JobReporter:
    """Writes one job's lifecycle, log lines and checkpoints, each in its own transaction
    so that what was reported survives a crash a moment later."""

    def __init__(self, database: Database, job_key: str) -> None:
        """`job_key` is the job's key (`Job.key`), the name it was launched under."""
        self._db = database
        self.job_key = job_key

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
        self.log(f"{PLAN_PREFIX}{total_steps} steps" + (f" ({detail})" if detail else ""))

    def log(self, *lines: str) -> None:
        with self._db.transaction() as session:
            JobStore(session).append_log(self.job_key, *lines)

    def checkpoint(self, *, iters: int, path: str, metrics: dict[str, Any] | None = None) -> None:
        with self._db.transaction() as session:
            JobStore(session).add_checkpoint(self.job_key, iters=iters, path=path, metrics=metrics)

    def status(self) -> JobStatus | None:
        with self._db.transaction() as session:
            return JobStore(session).status_of(self.job_key)
