"""The job lifecycle on both backends: idempotent creation, legal moves only, lost races
reported rather than overwritten."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from corral.errors import Conflict, NotFound
from corral.store.db import Database
from corral.store.jobs import (
    LEGAL_MOVES,
    IllegalTransition,
    JobKind,
    JobStatus,
    JobStore,
)
from corral.tenancy import job_key

pytestmark = pytest.mark.integration
SFT = JobKind.SUPERVISED_FINE_TUNE
REQUEST = {"model": "llama3_8b", "algorithm": "lora", "training_config": {"n_epochs": 1}}


def _key(job_uuid: str, tenant: str = "t1") -> str:
    """The key the store knows a job by (what the tests' transitions and logs take)."""
    return job_key(tenant, job_uuid)


def _create(db: Database, job_uuid: str = "job-1", **overrides: object) -> None:
    args: dict[str, object] = {"tenant": "t1", "kind": SFT, "request": REQUEST} | overrides
    with db.transaction() as session:
        JobStore(session).create(job_uuid=job_uuid, **args)  # type: ignore[arg-type]


def _status(db: Database, job_uuid: str = "job-1") -> JobStatus | None:
    with db.transaction() as session:
        return JobStore(session).status_of(_key(job_uuid))


def test_terminal_flags_and_spec_values() -> None:
    assert {s for s in JobStatus if s.is_terminal} == {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    }
    assert all(not LEGAL_MOVES[s] for s in JobStatus if s.is_terminal)
    assert JobStatus.CANCELLED.spec_value == "failed"
    assert {s.spec_value for s in JobStatus} == {"scheduled", "running", "completed", "failed"}


def test_create_is_idempotent_by_uuid(database: Database) -> None:
    with database.transaction() as session:
        first = JobStore(session).create(job_uuid="job-1", tenant="t1", kind=SFT, request=REQUEST)
    with database.transaction() as session:
        # Same body with keys in another order: the same request.
        again = JobStore(session).create(
            job_uuid="job-1", tenant="t1", kind=SFT, request=dict(reversed(REQUEST.items()))
        )
    assert first.created and not again.created
    assert again.job.uuid == "job-1"
    assert again.job.status == JobStatus.SCHEDULED


@pytest.mark.parametrize(
    "overrides",
    [
        {"request": {**REQUEST, "algorithm": "full"}},
        {"kind": JobKind.PREFERENCE_OPTIMIZE},
    ],
    ids=["other-body", "other-kind"],
)
def test_same_uuid_with_other_request_conflicts(
    database: Database, overrides: dict[str, object]
) -> None:
    _create(database)
    with pytest.raises(Conflict):
        _create(database, **overrides)
    with database.transaction() as session:
        assert JobStore(session).get("job-1", tenant="t1").request == REQUEST


def test_uuids_live_in_each_tenants_namespace(database: Database) -> None:
    """Another tenant's job under the same uuid is its own job, not a conflict: a 409 would
    tell that tenant the uuid is taken."""
    _create(database)
    _create(database, tenant="t2", request={**REQUEST, "algorithm": "full"})
    with database.transaction() as session:
        store = JobStore(session)
        mine, theirs = store.get("job-1", tenant="t1"), store.get("job-1", tenant="t2")
        assert mine.key != theirs.key
        assert (mine.request, theirs.request["algorithm"]) == (REQUEST, "full")
        store.append_log(theirs.key, "only theirs")
        assert store.log_lines(mine.key) == []


def test_concurrent_creates_make_one_job(database: Database) -> None:
    barrier = threading.Barrier(4)

    def create() -> bool:
        barrier.wait()
        with database.transaction() as session:
            return (
                JobStore(session)
                .create(job_uuid="race", tenant="t1", kind=SFT, request=REQUEST)
                .created
            )

    with ThreadPoolExecutor(4) as pool:
        created = list(pool.map(lambda _: create(), range(4)))
    assert created.count(True) == 1


def test_get_is_scoped_by_tenant(database: Database) -> None:
    _create(database)
    with database.transaction() as session, pytest.raises(NotFound):
        JobStore(session).get("job-1", tenant="someone-else")


def test_lifecycle_sets_times_and_attempts(database: Database) -> None:
    _create(database)
    with database.transaction() as session:
        store = JobStore(session)
        assert store.transition(_key("job-1"), to=JobStatus.RUNNING).applied
        assert store.transition(_key("job-1"), to=JobStatus.SCHEDULED).applied  # requeue
        assert store.transition(_key("job-1"), to=JobStatus.RUNNING).applied
        done = store.transition(
            _key("job-1"), to=JobStatus.COMPLETED, resources_allocated={"num_workers": 2}
        )
        assert done.applied
        job = store.get("job-1", tenant="t1")
        assert job.attempt == 1
        assert job.started_at is not None and job.completed_at is not None
        assert job.scheduled_at <= job.started_at <= job.completed_at
        assert job.resources_allocated == {"num_workers": 2}


def test_terminal_status_never_changes(database: Database) -> None:
    _create(database)
    with database.transaction() as session:
        store = JobStore(session)
        store.transition(_key("job-1"), to=JobStatus.CANCELLED, error="cancelled by user")
        for to in JobStatus:
            outcome = store.transition(_key("job-1"), to=to)
            assert not outcome.applied
            assert outcome.status is JobStatus.CANCELLED
            assert outcome.refused == "illegal"
        assert store.get("job-1", tenant="t1").error == "cancelled by user"


def test_stale_expectation_is_reported_not_applied(database: Database) -> None:
    _create(database)
    with database.transaction() as session:
        JobStore(session).transition(_key("job-1"), to=JobStatus.RUNNING)
    with database.transaction() as session:
        outcome = JobStore(session).transition(
            _key("job-1"), to=JobStatus.FAILED, expected=JobStatus.SCHEDULED
        )
    assert outcome.applied is False
    assert outcome.refused == "stale"
    assert outcome.status is JobStatus.RUNNING
    assert _status(database) is JobStatus.RUNNING


def test_never_legal_move_is_a_programming_error(database: Database) -> None:
    _create(database)
    with database.transaction() as session, pytest.raises(IllegalTransition):
        JobStore(session).transition(
            _key("job-1"), to=JobStatus.RUNNING, expected=JobStatus.COMPLETED
        )


def test_unknown_job(database: Database) -> None:
    with database.transaction() as session, pytest.raises(NotFound):
        JobStore(session).transition(_key("nope"), to=JobStatus.RUNNING)


def test_late_completion_cannot_overwrite_cancel(database: Database) -> None:
    """Two writers race from RUNNING: cancel and complete. Exactly one wins."""
    _create(database)
    with database.transaction() as session:
        JobStore(session).transition(_key("job-1"), to=JobStatus.RUNNING)
    barrier = threading.Barrier(2)

    def move(to: JobStatus) -> bool:
        barrier.wait()
        with database.transaction() as session:
            return JobStore(session).transition(_key("job-1"), to=to).applied

    with ThreadPoolExecutor(2) as pool:
        results = dict(
            zip(
                (JobStatus.CANCELLED, JobStatus.COMPLETED),
                pool.map(move, (JobStatus.CANCELLED, JobStatus.COMPLETED)),
                strict=True,
            )
        )
    assert sum(results.values()) == 1
    winner = next(to for to, applied in results.items() if applied)
    assert _status(database) is winner


def test_logs_and_checkpoints(database: Database) -> None:
    _create(database)
    with database.transaction() as session:
        store = JobStore(session)
        store.append_log(_key("job-1"), "step 1 loss 2.0", "step 2 loss 1.5")
        store.add_checkpoint(_key("job-1"), iters=2, path="/ckpt/2", metrics={"loss": 1.5})
        store.add_checkpoint(_key("job-1"), iters=1, path="/ckpt/1")
    with database.transaction() as session:
        store = JobStore(session)
        assert [line.line for line in store.log_lines(_key("job-1"))] == [
            "step 1 loss 2.0",
            "step 2 loss 1.5",
        ]
        first_id = store.log_lines(_key("job-1"))[0].id
        assert [line.line for line in store.log_lines(_key("job-1"), after_id=first_id)] == [
            "step 2 loss 1.5"
        ]
        checkpoints = store.checkpoints(_key("job-1"))
        assert [(c.iters, c.path, c.tenant) for c in checkpoints] == [
            (1, "/ckpt/1", "t1"),
            (2, "/ckpt/2", "t1"),
        ]


def test_list_filters_and_paginates(database: Database) -> None:
    for i in range(5):
        _create(database, f"job-{i}")
    _create(database, "other-tenant-job", tenant="t2")
    with database.transaction() as session:
        store = JobStore(session)
        store.transition(_key("job-0"), to=JobStatus.RUNNING)
        store.transition(_key("job-1"), to=JobStatus.FAILED)
    with database.transaction() as session:
        store = JobStore(session)
        assert [j.uuid for j in store.find(tenant="t1", statuses=[JobStatus.RUNNING])] == ["job-0"]
        page1 = store.find(tenant="t1", limit=3)
        page2 = store.find(tenant="t1", limit=3, offset=3)
        assert len(page1) == 3 and len(page2) == 2
        assert {j.uuid for j in page1 + page2} == {f"job-{i}" for i in range(5)}
