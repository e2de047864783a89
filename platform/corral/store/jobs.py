"""Job lifecycle: the status enum, its legal moves, and the one function that makes them;
and the reads every job kind shares (logs, checkpoints, per-step metrics, progress)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.errors import Conflict, NotFound
from corral.store.digest import request_digest
from corral.store.tables import Checkpoint, Job, JobLogLine, JobMetric, utcnow
from corral.tenancy import job_key


class JobStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL

    @property
    def spec_value(self) -> Literal["scheduled", "running", "completed", "failed"]:
        """What the spec's endpoints show: its enum has no `cancelled`, so it reads `failed`
        (the job's `error` says it was cancelled)."""
        if self is JobStatus.CANCELLED:
            return "failed"
        return self.value  # type: ignore[return-value]


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

LEGAL_MOVES: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SCHEDULED: frozenset({JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED}),
    # RUNNING -> SCHEDULED requeues a run that lost its workers; it counts a new attempt.
    JobStatus.RUNNING: frozenset(
        {JobStatus.SCHEDULED, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED}
    ),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class JobKind(enum.StrEnum):
    SUPERVISED_FINE_TUNE = "supervised_fine_tune"
    PREFERENCE_OPTIMIZE = "preference_optimize"
    SYNTHETIC_DATA_GENERATION = "synthetic_data_generation"

    @property
    def is_training(self) -> bool:
        """A post-training job (what the /post_training routes show)."""
        return self in _TRAINING

    @property
    def relaunches_after_crash(self) -> bool:
        """Whether a job whose process died without reporting is run again, as a new
        attempt that resumes its unfinished work (services/reconciler.py). Generation
        jobs are: every finished batch is saved, and an attempt skips them
        (jobs/sdg/job.py). Training jobs are not (yet): Ray Train restarts their
        workers within the attempt, and a dead driver fails the job."""
        return self is JobKind.SYNTHETIC_DATA_GENERATION


_TRAINING = frozenset({JobKind.SUPERVISED_FINE_TUNE, JobKind.PREFERENCE_OPTIMIZE})
TRAINING_KINDS = tuple(kind for kind in JobKind if kind.is_training)


class IllegalTransition(ValueError):
    """A move the lifecycle never allows, asked for by code (a bug, not a race)."""


@dataclass(frozen=True)
class TransitionOutcome:
    """What `JobStore.transition` did.

    `applied` is False when the stored status did not allow the move at the moment of the
    update: `refused` is "stale" when the caller's `expected` status no longer held (it
    lost a race) and "illegal" when the move is not allowed from the stored status (e.g.
    the job is already terminal).
    `status` is the status stored after the call either way.
    """

    applied: bool
    status: JobStatus
    refused: Literal["illegal", "stale"] | None = None


@dataclass(frozen=True)
class Progress:
    """How far a job got: the step it recorded last (0 before its first), out of the
    planned total, with the loss of that step where it has one."""

    step: int
    total_steps: int | None
    loss: float | None


@dataclass(frozen=True)
class CreateOutcome:
    job: Job
    created: bool


def _same_or_conflict(job: Job, *, kind: JobKind, digest: str) -> None:
    if (job.kind, job.request_digest) != (kind.value, digest):
        raise Conflict(f"job {job.uuid!r} already exists with a different request")


class JobStore:
    """Reads and writes jobs inside the caller's transaction; never commits on its own.

    Clients name a job by (tenant, uuid): `create` and `get` take those. Everything else
    takes the job's key (`Job.key`, `corral.tenancy.job_key`), the name it has outside the
    store, which the job process and the reconciler know it by."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def create(
        self,
        *,
        job_uuid: str,
        tenant: str,
        kind: JobKind,
        request: dict[str, Any],
        launch: dict[str, Any] | None = None,
        need: dict[str, float] | None = None,
        admitted: bool = True,
    ) -> CreateOutcome:
        """Store a scheduled job, or return the stored one if the same request was sent
        before. The same uuid with a different request (or kind) is a Conflict; another
        tenant's jobs are never compared against. `launch` is what the job process will
        run and `need` what it holds on the cluster; neither is part of the comparison.
        `admitted=False` stores it queued, for the admission pass to let through
        (corral/services/admission.py); otherwise it is admitted as it is stored."""
        digest = request_digest(request)
        existing = self.same_request(tenant=tenant, job_uuid=job_uuid, kind=kind, request=request)
        if existing is None:
            now = utcnow()
            job = Job(
                key=job_key(tenant, job_uuid),
                uuid=job_uuid,
                tenant=tenant,
                kind=kind.value,
                status=JobStatus.SCHEDULED.value,
                request=request,
                request_digest=digest,
                scheduled_at=now,
                updated_at=now,
                attempt=0,
                launch=launch,
                need=need,
                admitted_at=now if admitted else None,
            )
            try:
                with self._session.begin_nested():
                    self._session.add(job)
            except IntegrityError:
                # A concurrent create of the same uuid won; compare against its row.
                existing = self._find(tenant, job_uuid, fresh=True)
                if existing is None:
                    raise
                _same_or_conflict(existing, kind=kind, digest=digest)
            else:
                return CreateOutcome(job=job, created=True)
        return CreateOutcome(job=existing, created=False)

    def same_request(
        self, *, tenant: str, job_uuid: str, kind: JobKind, request: dict[str, Any]
    ) -> Job | None:
        """The tenant's job `job_uuid` if it exists and was made by this same request;
        None if there is none; Conflict if another request made it. Lets a service answer a
        repeated submission before doing the work a new one needs."""
        existing = self._find(tenant, job_uuid)
        if existing is not None:
            _same_or_conflict(existing, kind=kind, digest=request_digest(request))
        return existing

    def _find(self, tenant: str, job_uuid: str, *, fresh: bool = False) -> Job | None:
        # By (tenant, uuid), not by the derived key: jobs stored before keys existed were
        # given their uuid as their key.
        query = select(Job).where(Job.tenant == tenant, Job.uuid == job_uuid)
        if fresh:
            query = query.execution_options(populate_existing=True)
        return self._session.scalars(query).one_or_none()

    def get(self, job_uuid: str, *, tenant: str, kinds: Sequence[JobKind] = ()) -> Job:
        """The tenant's job `job_uuid`; NotFound for any other tenant's, and with `kinds`,
        for a job of another kind."""
        job = self._find(tenant, job_uuid)
        if job is None or (kinds and JobKind(job.kind) not in kinds):
            raise NotFound(f"no job {job_uuid[:200]!r}")
        return job

    def by_key(self, key: str) -> Job:
        job = self._session.get(Job, key)
        if job is None:
            raise NotFound(f"no job with key {key[:200]!r}")
        return job

    def status_of(self, key: str) -> JobStatus | None:
        status = self._session.scalar(select(Job.status).where(Job.key == key))
        return JobStatus(status) if status is not None else None

    def find(
        self,
        *,
        tenant: str,
        statuses: Sequence[JobStatus] = (),
        kinds: Sequence[JobKind] = (),
        limit: int = 100,
        offset: int = 0,
    ) -> list[Job]:
        """The tenant's jobs, newest first; empty `statuses` or `kinds` mean any."""
        query = select(Job).where(Job.tenant == tenant)
        if statuses:
            query = query.where(Job.status.in_([s.value for s in statuses]))
        if kinds:
            query = query.where(Job.kind.in_([k.value for k in kinds]))
        query = query.order_by(Job.scheduled_at.desc(), Job.key).limit(limit).offset(offset)
        return list(self._session.scalars(query))

    def unsettled(self, *, limit: int = 1000) -> list[Job]:
        """Jobs of every tenant that have not reached a terminal status, oldest first:
        what the reconciler compares against Ray."""
        open_statuses = [s.value for s in JobStatus if not s.is_terminal]
        query = (
            select(Job)
            .where(Job.status.in_(open_statuses))
            .order_by(Job.scheduled_at, Job.key)
            .limit(limit)
        )
        return list(self._session.scalars(query))

    def pending_stops(self, *, limit: int = 1000) -> list[Job]:
        """Cancelled jobs whose Ray job has not been seen to end yet, oldest first."""
        query = (
            select(Job)
            .where(Job.status == JobStatus.CANCELLED.value, Job.stop_pending.is_(True))
            .order_by(Job.scheduled_at, Job.key)
            .limit(limit)
        )
        return list(self._session.scalars(query))

    def counts(self) -> dict[tuple[JobKind, JobStatus], int]:
        """How many jobs of every tenant there are of each kind in each status, every pair
        included (zero where there is none): what the metrics report."""
        query = select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
        found = {(kind, status): n for kind, status, n in self._session.execute(query).tuples()}
        return {
            (kind, status): found.get((kind.value, status.value), 0)
            for kind in JobKind
            for status in JobStatus
        }

    def set_stop_pending(self, key: str, pending: bool) -> None:
        self._session.execute(
            update(Job)
            .where(Job.key == key)
            .values(stop_pending=pending)
            .execution_options(synchronize_session=False)
        )

    def transition(
        self,
        key: str,
        *,
        to: JobStatus,
        expected: JobStatus | None = None,
        error: str | None = None,
        resources_allocated: dict[str, Any] | None = None,
    ) -> TransitionOutcome:
        """Move a job to `to` if its stored status allows it, in one conditional UPDATE.

        With `expected`, the move happens only from that status. A terminal status never
        changes. Nothing is overwritten on a lost race: the outcome reports it instead.
        """
        if expected is not None and to not in LEGAL_MOVES[expected]:
            raise IllegalTransition(f"{expected} -> {to} is never legal")
        sources = (
            [expected]
            if expected is not None
            else [s for s, targets in LEGAL_MOVES.items() if to in targets]
        )
        now = utcnow()
        values: dict[str, Any] = {"status": to.value, "updated_at": now}
        if to is JobStatus.RUNNING:
            values["started_at"] = func.coalesce(Job.started_at, now)
        if to is JobStatus.SCHEDULED:
            values["attempt"] = Job.attempt + 1
        if to.is_terminal:
            values["completed_at"] = now
        if error is not None:
            values["error"] = error
        if resources_allocated is not None:
            values["resources_allocated"] = resources_allocated
        result = self._session.execute(
            update(Job)
            .where(Job.key == key, Job.status.in_([s.value for s in sources]))
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            self._session.expire_all()
            return TransitionOutcome(applied=True, status=to)
        current = self.status_of(key)
        if current is None:
            raise NotFound(f"no job with key {key[:200]!r}")
        # A caller whose expectation no longer holds lost a race, whatever it asked for.
        refused: Literal["illegal", "stale"] = (
            "stale" if expected is not None and current is not expected else "illegal"
        )
        return TransitionOutcome(applied=False, status=current, refused=refused)

    def append_log(self, key: str, *lines: str, at: datetime | None = None) -> None:
        logged_at = at or utcnow()
        self._session.add_all(
            JobLogLine(job_key=key, logged_at=logged_at, line=line) for line in lines
        )

    def log_lines(
        self, key: str, *, after_id: int = 0, limit: int | None = None
    ) -> list[JobLogLine]:
        query = (
            select(JobLogLine)
            .where(JobLogLine.job_key == key, JobLogLine.id > after_id)
            .order_by(JobLogLine.id)
        )
        if limit is not None:
            query = query.limit(limit)
        return list(self._session.scalars(query))

    def add_checkpoint(
        self, key: str, *, iters: int, path: str, metrics: dict[str, Any] | None = None
    ) -> Checkpoint:
        job = self.by_key(key)
        checkpoint = Checkpoint(
            job_key=key,
            tenant=job.tenant,
            iters=iters,
            path=path,
            metrics=metrics,
            created_at=utcnow(),
        )
        self._session.add(checkpoint)
        self._session.flush()
        return checkpoint

    def checkpoints(self, key: str) -> list[Checkpoint]:
        query = select(Checkpoint).where(Checkpoint.job_key == key).order_by(Checkpoint.iters)
        return list(self._session.scalars(query))

    def checkpoint_counts(self, keys: Sequence[str]) -> dict[str, int]:
        """How many checkpoints each of these jobs has (jobs with none are left out)."""
        if not keys:
            return {}
        query = (
            select(Checkpoint.job_key, func.count())
            .where(Checkpoint.job_key.in_(keys))
            .group_by(Checkpoint.job_key)
        )
        return {key: count for key, count in self._session.execute(query).tuples()}

    # ------------------------------------------------------------------ metrics

    def set_total_steps(self, key: str, total_steps: int) -> None:
        self._session.execute(
            update(Job)
            .where(Job.key == key)
            .values(total_steps=total_steps)
            .execution_options(synchronize_session=False)
        )

    def record_metrics(
        self,
        key: str,
        *,
        step: int,
        values: dict[str, float],
        epoch: int | None = None,
        at: datetime | None = None,
    ) -> JobMetric:
        """Merge `values` into the job's row for `step` (made if it has none): a step's
        training and validation figures arrive apart, and a retried attempt that runs a
        step again overwrites what the step measured before."""
        recorded_at = at or utcnow()
        row = self._session.scalars(
            select(JobMetric).where(JobMetric.job_key == key, JobMetric.step == step)
        ).one_or_none()
        if row is None:
            row = JobMetric(
                job_key=key, step=step, epoch=epoch, recorded_at=recorded_at, values=values
            )
            self._session.add(row)
        else:
            row.values = {**row.values, **values}
            row.recorded_at = recorded_at
            if epoch is not None:
                row.epoch = epoch
        self._session.flush()
        return row

    def metrics(
        self, key: str, *, after_step: int | None = None, limit: int | None = None
    ) -> list[JobMetric]:
        """The job's per-step rows in step order, those after `after_step` only if given."""
        query = select(JobMetric).where(JobMetric.job_key == key).order_by(JobMetric.step)
        if after_step is not None:
            query = query.where(JobMetric.step > after_step)
        if limit is not None:
            query = query.limit(limit)
        return list(self._session.scalars(query))

    def progress(self, job: Job) -> Progress | None:
        """From the row recorded last (a resumed attempt is where it is now, not where
        the lost one got to); None for a job that has planned and recorded nothing."""
        return self.progress_of([job]).get(job.key)

    def progress_of(self, jobs: Sequence[Job]) -> dict[str, Progress]:
        """`progress` of each of `jobs` by key, in one query (a page of the job list)."""
        if not jobs:
            return {}
        latest = (
            select(
                JobMetric.job_key,
                JobMetric.step,
                JobMetric.values,
                func.row_number()
                .over(
                    partition_by=JobMetric.job_key,
                    order_by=(JobMetric.recorded_at.desc(), JobMetric.step.desc()),
                )
                .label("rank"),
            )
            .where(JobMetric.job_key.in_([job.key for job in jobs]))
            .subquery()
        )
        last = {
            key: (step, values)
            for key, step, values in self._session.execute(
                select(latest.c.job_key, latest.c.step, latest.c["values"]).where(
                    latest.c.rank == 1
                )
            )
        }
        found: dict[str, Progress] = {}
        for job in jobs:
            if job.key not in last and job.total_steps is None:
                continue
            step, values = last.get(job.key, (0, {}))
            loss = values.get("loss")
            found[job.key] = Progress(
                step=step,
                total_steps=job.total_steps,
                loss=float(loss) if isinstance(loss, int | float) else None,
            )
        return found
