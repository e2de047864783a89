"""A hypothesis state machine drives random transitions, some from concurrent writers,
against a real database, and checks that the stored lifecycle is always one a serial
history of legal moves could have produced."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from corral.store.db import Database
from corral.store.jobs import (
    LEGAL_MOVES,
    IllegalTransition,
    JobKind,
    JobStatus,
    JobStore,
    TransitionOutcome,
)
from corral.tenancy import job_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

statuses = st.sampled_from(list(JobStatus))


def _serial_order(
    start: JobStatus, applied: Sequence[JobStatus], end: JobStatus
) -> tuple[JobStatus, ...] | None:
    """An order of the applied moves that is a chain of legal moves from start to end,
    or None when no serial history explains what the writers saw."""
    for order in itertools.permutations(applied):
        current = start
        for to in order:
            if to not in LEGAL_MOVES[current]:
                break
            current = to
        else:
            if current == end:
                return order
    return None


class JobLifecycle(RuleBasedStateMachine):
    database: Database
    pool: ThreadPoolExecutor
    jobs = Bundle("jobs")
    _counter = itertools.count()

    def __init__(self) -> None:
        super().__init__()
        self.expected: dict[str, JobStatus] = {}
        self.requeues: dict[str, int] = {}

    def _transition(
        self, job_uuid: str, to: JobStatus, expected: JobStatus | None = None
    ) -> TransitionOutcome:
        with self.database.transaction() as session:
            return JobStore(session).transition(job_key("t", job_uuid), to=to, expected=expected)

    @initialize(target=jobs)
    def first_job(self) -> str:
        return self.create_job()

    @rule(target=jobs)
    def create_job(self) -> str:
        job_uuid = f"job-{next(self._counter)}"
        with self.database.transaction() as session:
            JobStore(session).create(
                job_uuid=job_uuid,
                tenant="t",
                kind=JobKind.SUPERVISED_FINE_TUNE,
                request={"n": job_uuid},
            )
        self.expected[job_uuid] = JobStatus.SCHEDULED
        self.requeues[job_uuid] = 0
        return job_uuid

    @rule(job=jobs, to=statuses, use_expected=st.booleans())
    def one_writer(self, job: str, to: JobStatus, use_expected: bool) -> None:
        current = self.expected[job]
        if use_expected and to not in LEGAL_MOVES[current]:
            with pytest.raises(IllegalTransition):
                self._transition(job, to, expected=current)
            return
        outcome = self._transition(job, to, expected=current if use_expected else None)
        assert outcome.applied == (to in LEGAL_MOVES[current])
        if outcome.applied:
            self._record(job, current, to)
        else:
            assert outcome.status is current
            assert outcome.refused == "illegal"

    @rule(job=jobs, moves=st.lists(statuses, min_size=2, max_size=4), cas=st.booleans())
    def concurrent_writers(self, job: str, moves: list[JobStatus], cas: bool) -> None:
        """Several writers move the same job at once. With `cas`, each expects the status it
        last saw (so at most one can win); without, each asks for its move outright."""
        start = self.expected[job]
        targets = [to for to in moves if to in LEGAL_MOVES[start]] if cas else moves
        if len(targets) < 2:
            return
        barrier = threading.Barrier(len(targets))

        def attempt(to: JobStatus) -> TransitionOutcome:
            barrier.wait(timeout=30)
            return self._transition(job, to, expected=start if cas else None)

        outcomes = list(self.pool.map(attempt, targets))
        applied = [to for to, o in zip(targets, outcomes, strict=True) if o.applied]
        with self.database.transaction() as session:
            stored = JobStore(session).status_of(job_key("t", job))
        assert stored is not None
        if cas:
            assert len(applied) == 1, (start, targets, outcomes)
            assert all(o.refused == "stale" for o in outcomes if not o.applied)
        order = _serial_order(start, applied, stored)
        assert order is not None, (start, applied, stored)
        if start.is_terminal:
            assert not applied
        current = start
        for to in order:
            self._record(job, current, to)
            current = to

    def _record(self, job: str, frm: JobStatus, to: JobStatus) -> None:
        if frm is JobStatus.RUNNING and to is JobStatus.SCHEDULED:
            self.requeues[job] += 1
        self.expected[job] = to

    @invariant()
    def stored_rows_match_the_model(self) -> None:
        if not self.expected:
            return
        with self.database.transaction() as session:
            store = JobStore(session)
            for job_uuid, status in self.expected.items():
                row = store.get(job_uuid, tenant="t")
                assert JobStatus(row.status) is status
                assert row.attempt == self.requeues[job_uuid]
                assert (row.completed_at is not None) == status.is_terminal
                if status is JobStatus.RUNNING:
                    assert row.started_at is not None


def _run_machine(database: Database) -> None:
    with ThreadPoolExecutor(4) as pool:
        JobLifecycle.database = database
        JobLifecycle.pool = pool
        runner = JobLifecycle.TestCase()
        runner.settings = settings(
            max_examples=15,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        runner.runTest()


def test_lifecycle_state_machine(database: Database) -> None:
    _run_machine(database)


def test_serial_history_check_rejects_impossible_outcomes() -> None:
    """The checker itself must be able to fail."""
    assert _serial_order(JobStatus.RUNNING, [JobStatus.COMPLETED], JobStatus.FAILED) is None
    assert (
        _serial_order(
            JobStatus.RUNNING, [JobStatus.COMPLETED, JobStatus.CANCELLED], JobStatus.CANCELLED
        )
        is None
    )
    assert _serial_order(
        JobStatus.RUNNING, [JobStatus.RUNNING, JobStatus.SCHEDULED], JobStatus.RUNNING
    ) == (JobStatus.SCHEDULED, JobStatus.RUNNING)
