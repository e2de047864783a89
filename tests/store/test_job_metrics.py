"""Per-step metrics and progress on both backends: a step's figures merge into one row,
pages follow steps, progress is the step recorded last, and a job's metrics go with it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select

from corral.errors import NotFound
from corral.store.db import Database
from corral.store.jobs import TRAINING_KINDS, JobKind, JobStore, Progress
from corral.store.tables import Job, JobMetric, utcnow
from corral.tenancy import job_key

pytestmark = pytest.mark.integration
KEY = job_key("t1", "job-1")


@pytest.fixture
def job(database: Database) -> str:
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid="job-1", tenant="t1", kind=JobKind.SUPERVISED_FINE_TUNE, request={}
        )
    return KEY


def test_figures_of_a_step_merge_and_pages_follow_steps(database: Database, job: str) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        store.record_metrics(job, step=0, epoch=0, values={"validation_loss": 3.0})
        for step in range(1, 6):
            store.record_metrics(job, step=step, epoch=1, values={"loss": 3.0 - step / 10})
        store.record_metrics(job, step=5, values={"validation_loss": 2.0})
    with database.transaction() as session:
        store = JobStore(session)
        rows = store.metrics(job)
        assert [(r.step, r.epoch) for r in rows] == [(0, 0), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
        assert rows[-1].values == {"loss": 2.5, "validation_loss": 2.0}
        assert rows[0].recorded_at.tzinfo is not None
        assert [r.step for r in store.metrics(job, after_step=2, limit=2)] == [3, 4]
        assert [r.step for r in store.metrics(job, after_step=4)] == [5]
        assert store.metrics(job, after_step=5) == []


def test_progress_is_the_step_recorded_last(database: Database, job: str) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        assert store.progress(store.by_key(job)) is None  # nothing planned or recorded
        store.set_total_steps(job, 8)
    with database.transaction() as session:
        store = JobStore(session)
        assert store.progress(store.by_key(job)) == Progress(step=0, total_steps=8, loss=None)
        start = utcnow()
        for step in range(1, 6):
            at = start + timedelta(seconds=step)
            store.record_metrics(job, step=step, values={"loss": 1.0 / step}, at=at)
        # A new attempt resumed from the checkpoint at step 2 and has run step 3 again.
        store.record_metrics(job, step=3, values={"loss": 0.3}, at=start + timedelta(seconds=9))
    with database.transaction() as session:
        store = JobStore(session)
        assert store.progress(store.by_key(job)) == Progress(step=3, total_steps=8, loss=0.3)


def test_progress_of_a_page_of_jobs_is_each_ones_progress(database: Database, job: str) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        for uuid in ("job-2", "job-3"):
            store.create(job_uuid=uuid, tenant="t1", kind=JobKind.SUPERVISED_FINE_TUNE, request={})
        second, third = job_key("t1", "job-2"), job_key("t1", "job-3")
        start = utcnow()
        store.record_metrics(job, step=4, values={"loss": 0.5}, at=start)
        store.record_metrics(job, step=2, values={"loss": 0.9}, at=start + timedelta(seconds=1))
        store.set_total_steps(second, 6)
        store.record_metrics(second, step=1, values={"learning_rate": 1e-3}, at=start)
    with database.transaction() as session:
        store = JobStore(session)
        jobs = [store.by_key(key) for key in (job, second, third)]
        page = store.progress_of(jobs)
        assert page == {
            job: Progress(step=2, total_steps=None, loss=0.9),  # the row recorded last
            second: Progress(step=1, total_steps=6, loss=None),
        }  # job-3 has planned and recorded nothing
        assert page == {j.key: p for j in jobs if (p := store.progress(j)) is not None}
        assert store.progress_of([]) == {}


def test_checkpoint_counts_and_kind_scopes(database: Database, job: str) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        store.create(
            job_uuid="gen-1", tenant="t1", kind=JobKind.SYNTHETIC_DATA_GENERATION, request={}
        )
        store.add_checkpoint(job, iters=1, path="/c/1")
        store.add_checkpoint(job, iters=2, path="/c/2")
    with database.transaction() as session:
        store = JobStore(session)
        other = job_key("t1", "gen-1")
        assert store.checkpoint_counts([job, other]) == {job: 2}
        assert store.checkpoint_counts([]) == {}
        assert [j.uuid for j in store.find(tenant="t1", kinds=TRAINING_KINDS)] == ["job-1"]
        assert {j.uuid for j in store.find(tenant="t1")} == {"job-1", "gen-1"}
        assert store.get("gen-1", tenant="t1").kind == "synthetic_data_generation"
        with pytest.raises(NotFound):
            store.get("gen-1", tenant="t1", kinds=TRAINING_KINDS)


def test_a_deleted_job_takes_its_metrics_with_it(database: Database, job: str) -> None:
    with database.transaction() as session:
        JobStore(session).record_metrics(job, step=1, values={"loss": 1.0})
    with database.transaction() as session:
        session.execute(delete(Job).where(Job.key == job))
    with database.transaction() as session:
        assert session.scalar(select(func.count()).select_from(JobMetric)) == 0
