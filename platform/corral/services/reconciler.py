"""Settles unfinished jobs against Ray, at API start-up and periodically.

The SQL row is the truth and the job process keeps it current; Ray's job status is the
evidence for the cases the job process could not report itself:

| row        | Ray says                 | the reconciler                                   |
|------------|--------------------------|--------------------------------------------------|
| scheduled  | never heard of it        | submits it (it never ran: the API stopped, or    |
|            |                          | Ray was down, between storing and submitting)    |
| running    | never heard of it        | fails it: the Ray job vanished (cluster lost)    |
| any        | PENDING / RUNNING        | leaves it                                        |
| any        | SUCCEEDED                | completed (the entrypoint exits 0 only then)     |
| any        | FAILED                   | failed, with Ray's message                       |
| any        | STOPPED                  | cancelled (someone stopped it in Ray)            |

Every change goes through `JobStore.transition` with the status that was read as
`expected`, so a job that reports in the meantime wins and nothing is overwritten.
A job is only ever submitted under its own uuid, so none can run twice.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from corral.errors import BackendUnavailable
from corral.ray_jobs import JobLauncher, RayJobState
from corral.store.db import Database
from corral.store.jobs import JobStatus, JobStore

log = logging.getLogger(__name__)

VANISHED = "the Ray job vanished: Ray has no record of it (was the cluster restarted?)"


@dataclass(frozen=True)
class Settled:
    job_uuid: str
    action: str  # "submitted", "completed", "failed", "cancelled", "left"


class Reconciler:
    def __init__(self, *, database: Database, launcher: JobLauncher) -> None:
        self._db = database
        self._launcher = launcher

    def settle(self) -> list[Settled]:
        """One pass over every unfinished job; returns what was done to each."""
        with self._db.transaction() as session:
            jobs = [(job.uuid, JobStatus(job.status)) for job in JobStore(session).unsettled()]
        return [self._settle_one(uuid, status) for uuid, status in jobs]

    def _settle_one(self, job_uuid: str, status: JobStatus) -> Settled:
        info = self._launcher.info(job_uuid)
        if info is None:
            if status is JobStatus.SCHEDULED:
                self._launcher.submit(job_uuid)
                self._log(job_uuid, "submitted to Ray by the reconciler")
                return Settled(job_uuid, "submitted")
            return self._move(job_uuid, status, JobStatus.FAILED, VANISHED)
        if not info.state.is_terminal:
            return Settled(job_uuid, "left")
        if info.state is RayJobState.SUCCEEDED:
            return self._move(job_uuid, status, JobStatus.COMPLETED, None)
        if info.state is RayJobState.STOPPED:
            return self._move(job_uuid, status, JobStatus.CANCELLED, "stopped in Ray")
        reason = f"the Ray job failed: {info.message or 'no message'}"
        return self._move(job_uuid, status, JobStatus.FAILED, reason)

    def _move(
        self, job_uuid: str, expected: JobStatus, to: JobStatus, error: str | None
    ) -> Settled:
        with self._db.transaction() as session:
            store = JobStore(session)
            outcome = store.transition(job_uuid, to=to, expected=expected, error=error)
            if outcome.applied:
                store.append_log(
                    job_uuid, f"reconciler: {to.value}" + (f": {error}" if error else "")
                )
        return Settled(job_uuid, to.value if outcome.applied else "left")

    def _log(self, job_uuid: str, line: str) -> None:
        with self._db.transaction() as session:
            JobStore(session).append_log(job_uuid, line)


class PeriodicReconciler:
    """Runs `Reconciler.settle` every `interval_s` on a daemon thread until stopped."""

    def __init__(self, reconciler: Reconciler, *, interval_s: float) -> None:
        self._reconciler = reconciler
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corral-reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._reconciler.settle()
            except BackendUnavailable as exc:
                log.warning("reconciler: %s", exc)
            except Exception:
                log.exception("reconciler pass failed")
