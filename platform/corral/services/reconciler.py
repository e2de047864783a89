"""Settles unfinished jobs against Ray, at API start-up and periodically.

The SQL row is the truth and the job process keeps it current; Ray's job status is the
evidence for the cases the job process could not report itself:

| row        | Ray says                 | the reconciler                                   |
|------------|--------------------------|--------------------------------------------------|
| scheduled, | (not asked)              | leaves it to admission (services/admission.py):  |
| queued     |                          | it is never submitted from here                  |
| scheduled, | never heard of it        | submits it (it never ran: the API stopped, or    |
| admitted   |                          | Ray was down, between admitting and submitting)  |
| running    | never heard of it, or    | relaunches it if its kind resumes (see below),   |
|            | FAILED                   | else as the next rows say                        |
| running    | never heard of it        | fails it: the Ray job vanished (cluster lost)    |
| any        | PENDING / RUNNING        | leaves it                                        |
| any        | SUCCEEDED                | completed (the entrypoint exits 0 only then)     |
| any        | FAILED                   | failed, with Ray's message                       |
| any        | STOPPED                  | cancelled (someone stopped it in Ray)            |
| cancelled, | PENDING / RUNNING        | stops the Ray job (it was cancelled while Ray    |
| stop       |                          | could not be reached); the stop stays pending    |
| pending    | ended, or never heard    | clears the pending stop                          |

Every change goes through `JobStore.transition` with the status that was read as
`expected`, so a job that reports in the meantime wins and nothing is overwritten: the
pass reports such a row as `stale`. A row read as `scheduled` whose Ray job has already
ended ran meanwhile; it is moved through `running`, since `scheduled -> completed` is
not a legal move. A job is only ever submitted under its own key, so none can run twice.

Rows are settled one by one, each on its own: an error on one row is logged and reported
for that row, and the pass goes on. Only Ray itself being unreachable ends a pass early
(every other row would fail the same way); the next pass tries again.

Relaunch. A row still `running` whose Ray job failed or vanished means the job's process
died without reporting (a crash, its node lost, the cluster restarted). A job of a kind
that resumes (`JobKind.relaunches_after_crash`: synthetic data generation, whose finished
batches are saved) is moved back to `scheduled`, which counts a new attempt, and
submitted again as that attempt (`corral.ray_jobs.submission_id`: each attempt is its own
Ray job), at most MAX_RELAUNCHES times; then it fails as any other. A relaunch keeps the
job's admission (it held its resources until its process died, and its work is half done):
it does not queue again. A job that failed by
itself has already said so in its row, so only a crash is ever relaunched.

Only rows that are `cancelled` have their Ray job stopped: a job that wrote `completed`
itself is still shutting down (its entrypoint has yet to exit) and must not be stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from corral.errors import BackendUnavailable
from corral.observability.context import job_context
from corral.ray_jobs import JobLauncher, RayJobInfo, RayJobState, submission_id
from corral.services.admission import Admitter
from corral.services.lease import Lease
from corral.store.db import Database
from corral.store.jobs import LEGAL_MOVES, JobKind, JobStatus, JobStore
from corral.store.tables import Job

log = logging.getLogger(__name__)

VANISHED = "the Ray job vanished: Ray has no record of it (was the cluster restarted?)"
# Attempts a job that resumes may be relaunched for, after its first.
MAX_RELAUNCHES = 2


@dataclass(frozen=True)
class Settled:
    job_key: str
    # "submitted", "relaunched", "completed", "failed", "cancelled", "left", "queued",
    # "stale", "stopped", "stop confirmed" or "error"
    action: str


@dataclass(frozen=True)
class _Run:
    """What the reconciler reads of a row: enough to find its Ray job."""

    key: str
    status: JobStatus
    attempt: int
    kind: JobKind
    admitted: bool = True

    @classmethod
    def of(cls, job: Job) -> _Run:
        admitted = job.admitted_at is not None
        return cls(job.key, JobStatus(job.status), job.attempt, JobKind(job.kind), admitted)

    @property
    def submission_id(self) -> str:
        return submission_id(self.key, self.attempt)


class Reconciler:
    def __init__(self, *, database: Database, launcher: JobLauncher) -> None:
        self._db = database
        self._launcher = launcher

    def settle(self) -> list[Settled]:
        """One pass over every unfinished job and every pending stop; returns what was done
        to each. Raises BackendUnavailable only when Ray cannot be reached at all."""
        with self._db.transaction() as session:
            store = JobStore(session)
            unsettled = [_Run.of(job) for job in store.unsettled()]
            stops = [_Run.of(job) for job in store.pending_stops()]
        settled = [self._isolated(run.key, self._settle_one, run) for run in unsettled]
        return settled + [self._isolated(run.key, self._stop_one, run) for run in stops]

    def _isolated(self, key: str, step: Callable[..., Settled], *args: object) -> Settled:
        with job_context(job_key=key):  # what is logged about the row carries its key
            try:
                return step(*args)
            except BackendUnavailable:
                raise
            except Exception as exc:
                log.exception("reconciler: job %s could not be settled", key)
                return Settled(key, f"error: {type(exc).__name__}")

    def _settle_one(self, run: _Run) -> Settled:
        key, status = run.key, run.status
        if status is JobStatus.SCHEDULED and not run.admitted:
            return Settled(key, "queued")  # admission's to hand to Ray; Ray has no record
        info = self._launcher.info(run.submission_id)
        if _crashed(run, info):
            return self._relaunch(run, VANISHED if info is None else _failure(info))
        if info is None:
            if status is JobStatus.SCHEDULED:
                self._launcher.submit(key, attempt=run.attempt)
                self._log(key, "submitted to Ray by the reconciler")
                return Settled(key, "submitted")
            return self._move(key, status, JobStatus.FAILED, VANISHED)
        if not info.state.is_terminal:
            return Settled(key, "left")
        if info.state is RayJobState.SUCCEEDED:
            return self._move(key, status, JobStatus.COMPLETED, None)
        if info.state is RayJobState.STOPPED:
            return self._move(key, status, JobStatus.CANCELLED, "stopped in Ray")
        return self._move(key, status, JobStatus.FAILED, _failure(info))

    def _relaunch(self, run: _Run, reason: str) -> Settled:
        """`running -> scheduled` (a new attempt), then submit that attempt. Should Ray
        refuse the submission now, the row stays scheduled and the next pass submits it."""
        with self._db.transaction() as session:
            store = JobStore(session)
            outcome = store.transition(run.key, to=JobStatus.SCHEDULED, expected=run.status)
            if not outcome.applied:
                return Settled(run.key, "stale")
            store.append_log(
                run.key,
                f"reconciler: the job's process ended without reporting ({reason}); "
                f"attempt {run.attempt + 1} resumes its unfinished work",
            )
        self._launcher.submit(run.key, attempt=run.attempt + 1)
        return Settled(run.key, "relaunched")

    def _stop_one(self, run: _Run) -> Settled:
        key = run.key
        info = self._launcher.info(run.submission_id)
        if info is None or info.state.is_terminal:
            with self._db.transaction() as session:
                JobStore(session).set_stop_pending(key, False)
            return Settled(key, "stop confirmed")
        self._launcher.stop(run.submission_id)
        self._log(key, "reconciler: asked Ray to stop the cancelled job")
        return Settled(key, "stopped")

    def _move(self, key: str, expected: JobStatus, to: JobStatus, error: str | None) -> Settled:
        """`expected -> to`, through `running` where the direct move is not legal (a row
        read as scheduled whose Ray job has ended: it ran in the meantime)."""
        with self._db.transaction() as session:
            store = JobStore(session)
            if to not in LEGAL_MOVES[expected]:
                through = store.transition(key, to=JobStatus.RUNNING, expected=expected)
                if not through.applied:
                    return Settled(key, "stale")
                expected = JobStatus.RUNNING
            outcome = store.transition(key, to=to, expected=expected, error=error)
            if not outcome.applied:
                return Settled(key, "stale")
            store.append_log(key, f"reconciler: {to.value}" + (f": {error}" if error else ""))
        return Settled(key, to.value)

    def _log(self, key: str, line: str) -> None:
        with self._db.transaction() as session:
            JobStore(session).append_log(key, line)


def _crashed(run: _Run, info: RayJobInfo | None) -> bool:
    """A running row of a kind that resumes, whose Ray job failed or vanished, with
    attempts left."""
    ended = info is None or info.state is RayJobState.FAILED
    return (
        run.status is JobStatus.RUNNING
        and ended
        and run.kind.relaunches_after_crash
        and run.attempt < MAX_RELAUNCHES
    )


def _failure(info: RayJobInfo) -> str:
    return f"the Ray job failed: {info.message or 'no message'}"


class PeriodicReconciler:
    """Runs a pass every `interval_s` on a daemon thread until stopped: `Reconciler.settle`,
    then, with an `admitter`, an admission pass (jobs that finished free their resources
    for the queue). With a `lease` (several API replicas on one database) a pass runs only
    while this replica holds it; stopping releases it."""

    def __init__(
        self,
        reconciler: Reconciler,
        *,
        interval_s: float,
        lease: Lease | None = None,
        admitter: Admitter | None = None,
    ) -> None:
        self._reconciler = reconciler
        self._interval_s = interval_s
        self._lease = lease
        self._admitter = admitter
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="corral-reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._lease is not None:
            self._lease.release()

    def run_once(self) -> list[Settled] | None:
        """One pass; None when another replica holds the lease. Raises what the pass
        raises (BackendUnavailable when Ray cannot be reached)."""
        if self._lease is not None and not self._lease.hold():
            return None
        settled = self._reconciler.settle()
        if self._admitter is not None:
            self._admitter.admit()
        return settled

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.run_once()
            except BackendUnavailable as exc:
                log.warning("reconciler: %s", exc)
            except Exception:
                log.exception("reconciler pass failed")
