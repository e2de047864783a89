from __future__ import annotations

import pytest

from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.reporting import JobReporter

pytestmark = pytest.mark.integration


def _key(job_uuid: str, tenant: str = "t") -> str:
    """The key the store knows a job by (what the tests' transitions and logs take)."""
    return job_key(tenant, job_uuid)


def _job(db: Database) -> JobReporter:
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid="j1", tenant="t", kind=JobKind.SUPERVISED_FINE_TUNE, request={"a": 1}
        )
    return JobReporter(db, _key("j1"))


def test_a_run_is_reported_to_the_store(database: Database) -> None:
    job = _job(database)
    assert job.started(resources_allocated={"num_workers": 2, "gpus": 0}).applied
    job.log("step 1 loss 2.31", "step 2 loss 2.02")
    job.checkpoint(iters=2, path="/tmp/ckpt-2", metrics={"loss": 2.02})
    assert job.completed().applied
    with database.transaction() as session:
        store = JobStore(session)
        row = store.get("j1", tenant="t")
        assert row.status == JobStatus.COMPLETED
        assert row.resources_allocated == {"num_workers": 2, "gpus": 0}
        assert [line.line for line in store.log_lines(_key("j1"))] == [
            "step 1 loss 2.31",
            "step 2 loss 2.02",
        ]
        assert [(c.iters, c.metrics) for c in store.checkpoints(_key("j1"))] == [
            (2, {"loss": 2.02})
        ]


def test_a_cancelled_job_cannot_complete_itself(database: Database) -> None:
    job = _job(database)
    job.started(resources_allocated={})
    with database.transaction() as session:
        JobStore(session).transition(_key("j1"), to=JobStatus.CANCELLED, error="cancelled by user")
    outcome = job.completed()
    assert not outcome.applied
    assert job.status() is JobStatus.CANCELLED


def test_failure_keeps_the_reason(database: Database) -> None:
    job = _job(database)
    job.started(resources_allocated={})
    job.failed("CUDA out of memory")
    with database.transaction() as session:
        store = JobStore(session)
        assert store.get("j1", tenant="t").error == "CUDA out of memory"
        assert store.log_lines(_key("j1"))[-1].line == "failed: CUDA out of memory"
