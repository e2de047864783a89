"""The rows admission reads and writes: the queue (scheduled jobs not yet admitted), the
jobs that hold or are about to hold resources (admitted, not finished), and the one
conditional UPDATE that admits a job. Inside the caller's transaction, like every store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, select, update
from sqlalchemy.orm import Session

from corral.store.jobs import JobStatus
from corral.store.tables import Job, utcnow
from jobs.resources import Need, job_need


@dataclass(frozen=True)
class JobNeed:
    """What admission knows of one job (never its launch config: it carries dataset rows)."""

    key: str
    uuid: str
    tenant: str
    status: JobStatus
    scheduled_at: datetime
    attempt: int
    need: Need
    queue_position: int | None = None
    queue_reason: str | None = None


_COLUMNS = (
    Job.key,
    Job.uuid,
    Job.tenant,
    Job.kind,
    Job.status,
    Job.scheduled_at,
    Job.attempt,
    Job.need,
    Job.queue_position,
    Job.queue_reason,
)


class AdmissionStore:
    def __init__(self, session: Session) -> None:
        self._session = session

    def queued(self) -> list[JobNeed]:
        """Scheduled jobs of every tenant not yet admitted, first come first."""
        query = (
            select(*_COLUMNS)
            .where(Job.status == JobStatus.SCHEDULED.value, Job.admitted_at.is_(None))
            .order_by(Job.scheduled_at, Job.key)
        )
        return self._read(query)

    def committed(self) -> list[JobNeed]:
        """Admitted jobs that have not finished: each holds its need on the cluster, or is
        about to (scheduled: handed to Ray, its workers not yet placed)."""
        query = (
            select(*_COLUMNS)
            .where(
                Job.status.in_([JobStatus.SCHEDULED.value, JobStatus.RUNNING.value]),
                Job.admitted_at.is_not(None),
            )
            .order_by(Job.scheduled_at, Job.key)
        )
        return self._read(query)

    def admit(self, key: str) -> bool:
        """Let a queued job through; False when it is no longer queued (cancelled, or
        admitted by another pass meanwhile): then it must not be handed to Ray here."""
        result = self._session.execute(
            update(Job)
            .where(
                Job.key == key,
                Job.status == JobStatus.SCHEDULED.value,
                Job.admitted_at.is_(None),
            )
            .values(admitted_at=utcnow(), queue_position=None, queue_reason=None)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def place(self, key: str, *, position: int, reason: str) -> None:
        """Record a queued job's place in the queue (1: next) and why it waits."""
        self._session.execute(
            update(Job)
            .where(Job.key == key, Job.admitted_at.is_(None))
            .values(queue_position=position, queue_reason=reason)
            .execution_options(synchronize_session=False)
        )

    def _read(self, query: Select[Any]) -> list[JobNeed]:
        rows = self._session.execute(query).all()
        missing = [row.key for row in rows if row.need is None]
        # Rows stored without a need (by code before admission counted it): from their
        # launch config, as the recipe reads it.
        launches: dict[str, dict[str, Any] | None] = {}
        if missing:
            found = self._session.execute(select(Job.key, Job.launch).where(Job.key.in_(missing)))
            launches = {key: launch for key, launch in found.tuples()}
        return [
            JobNeed(
                key=row.key,
                uuid=row.uuid,
                tenant=row.tenant,
                status=JobStatus(row.status),
                scheduled_at=row.scheduled_at,
                attempt=row.attempt,
                need=(
                    {str(k): float(v) for k, v in row.need.items()}
                    if row.need is not None
                    else job_need(row.kind, launches.get(row.key))
                ),
                queue_position=row.queue_position,
                queue_reason=row.queue_reason,
            )
            for row in rows
        ]
