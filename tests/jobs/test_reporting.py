from __future__ import annotations

import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.reporting import JobReporter
from jobs.transport import DatabaseTransport

pytestmark = pytest.mark.integration


def _key(job_uuid: str, tenant: str = "t") -> str:
    """The key the store knows a job by (what the tests' transitions and logs take)."""
    return job_key(tenant, job_uuid)


def _job(db: Database, **row: object) -> JobReporter:
    """Job j1 and its reporter; `row` gives its `request` and `launch`."""
    fields: dict[str, object] = {"request": {"a": 1}} | row
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid="j1",
            tenant="t",
            kind=JobKind.SUPERVISED_FINE_TUNE,
            **fields,  # type: ignore[arg-type]
        )
    return JobReporter(DatabaseTransport(db, _key("j1")))


def test_a_run_is_reported_to_the_store(database: Database, tmp_path: Path) -> None:
    job = _job(database, launch={"output_dir": str(tmp_path / "out")})
    assert job.started(resources_allocated={"num_workers": 2, "gpus": 0}).applied
    job.log("step 1 loss 2.31", "step 2 loss 2.02")
    job.checkpoint(iters=2, path=str(tmp_path / "out" / "ckpt-2"), metrics={"loss": 2.02})
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


def test_plan_and_metrics_are_data(database: Database, tmp_path: Path) -> None:
    job = _job(database, launch={"output_dir": str(tmp_path / "out")})
    job.plan(total_steps=4, detail="2 epochs of 2")
    job.metrics(step=1, epoch=1, loss=2.5, learning_rate=1e-3, tokens_per_second=float("nan"))
    job.metrics(step=1, epoch=1, validation_loss=math.inf)  # non-finite: left out
    job.close()
    with database.transaction() as session:
        store = JobStore(session)
        row = store.get("j1", tenant="t")
        assert row.total_steps == 4
        assert [(m.step, m.epoch, m.values) for m in store.metrics(_key("j1"))] == [
            (1, 1, {"loss": 2.5, "learning_rate": 1e-3})
        ]
        assert store.log_lines(_key("j1"))[-1].line == "plan: 4 steps (2 epochs of 2)"
    assert not (tmp_path / "out").exists()  # `logger_config` {}: no TensorBoard files


def test_tensorboard_files_when_the_job_asks_for_them(database: Database, tmp_path: Path) -> None:
    job = _job(
        database,
        request={"logger_config": {"tensorboard": True}},
        launch={"output_dir": str(tmp_path / "out")},
    )
    job.metrics(step=0, epoch=0, validation_loss=3.0)
    job.metrics(step=1, epoch=1, loss=2.5, learning_rate=1e-3)
    job.metrics(step=2, epoch=1, loss=2.0, learning_rate=5e-4)
    job.close()
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "learning_rate", "validation_loss"}
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.step for e in events.Scalars("validation_loss")] == [0]
