"""The reconciler settles unfinished jobs against what Ray says, on both database backends;
and the Ray Jobs launcher it talks to, against a real local cluster."""

from __future__ import annotations

import time

import pytest

from corral.errors import http_status_for
from corral.ray_jobs import RayJobInfo, RayJobLauncher, RayJobState, RayJobsUnavailable
from corral.services.reconciler import VANISHED, Reconciler
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.store.tables import Job

pytestmark = pytest.mark.integration


class ScriptedLauncher:
    """A `JobLauncher` whose Ray answers are set by the test."""

    def __init__(self, states: dict[str, RayJobInfo]) -> None:
        self.states = states
        self.submitted: list[str] = []

    def submit(self, job_uuid: str) -> bool:
        self.submitted.append(job_uuid)
        self.states[job_uuid] = RayJobInfo(RayJobState.PENDING)
        return True

    def info(self, job_uuid: str) -> RayJobInfo | None:
        return self.states.get(job_uuid)

    def stop(self, job_uuid: str) -> bool:
        return False


def _job(database: Database, uuid: str, status: JobStatus, launch: dict[str, object]) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        store.create(
            job_uuid=uuid,
            tenant="t",
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={"uuid": uuid},
            launch=launch,
        )
        if status is not JobStatus.SCHEDULED:
            store.transition(uuid, to=JobStatus.RUNNING)
        if status.is_terminal:
            store.transition(uuid, to=status)


def _row(database: Database, uuid: str) -> tuple[JobStatus, str | None]:
    with database.transaction() as session:
        job = session.get(Job, uuid)
        assert job is not None
        return JobStatus(job.status), job.error


CASES = [
    # (row, what Ray says, row afterwards, action)
    (JobStatus.SCHEDULED, None, JobStatus.SCHEDULED, "submitted"),
    (JobStatus.RUNNING, None, JobStatus.FAILED, "failed"),
    (JobStatus.SCHEDULED, RayJobState.PENDING, JobStatus.SCHEDULED, "left"),
    (JobStatus.RUNNING, RayJobState.RUNNING, JobStatus.RUNNING, "left"),
    (JobStatus.RUNNING, RayJobState.SUCCEEDED, JobStatus.COMPLETED, "completed"),
    (JobStatus.RUNNING, RayJobState.FAILED, JobStatus.FAILED, "failed"),
    (JobStatus.SCHEDULED, RayJobState.FAILED, JobStatus.FAILED, "failed"),
    (JobStatus.RUNNING, RayJobState.STOPPED, JobStatus.CANCELLED, "cancelled"),
    (JobStatus.COMPLETED, RayJobState.FAILED, JobStatus.COMPLETED, None),  # terminal: untouched
    (JobStatus.CANCELLED, RayJobState.RUNNING, JobStatus.CANCELLED, None),
]


def test_every_unfinished_job_gets_what_ray_says(database: Database) -> None:
    states: dict[str, RayJobInfo] = {}
    for index, (row, ray_state, _, _) in enumerate(CASES):
        _job(database, f"job-{index}", row, {})
        if ray_state is not None:
            states[f"job-{index}"] = RayJobInfo(ray_state, message="driver exited with code 1")
    launcher = ScriptedLauncher(states)

    settled = {
        s.job_uuid: s.action for s in Reconciler(database=database, launcher=launcher).settle()
    }

    for index, (_, _, after, action) in enumerate(CASES):
        uuid = f"job-{index}"
        assert settled.get(uuid) == action, uuid
        assert _row(database, uuid)[0] is after, uuid
    assert launcher.submitted == ["job-0"]
    assert _row(database, "job-1") == (JobStatus.FAILED, VANISHED)
    assert _row(database, "job-5")[1] == "the Ray job failed: driver exited with code 1"
    # A second pass finds nothing new to do: the one it submitted is now pending in Ray.
    again = Reconciler(database=database, launcher=launcher).settle()
    assert {s.action for s in again} == {"left"}
    assert launcher.submitted == ["job-0"]


@pytest.mark.slow
def test_the_ray_launcher_runs_the_fixed_entrypoint_which_reports_to_the_store(
    database: Database, ray_jobs_url: str
) -> None:
    """A job whose launch config cannot run: the real entrypoint starts under Ray, records
    the failure in the store and exits non-zero, so Ray's view agrees with the row."""
    launcher = RayJobLauncher(ray_jobs_url, database_url=database.url)
    uuid = f"broken-{time.monotonic_ns()}"
    _job(database, uuid, JobStatus.SCHEDULED, {"n_epochs": 0})
    assert launcher.info(uuid) is None

    # Nothing in Ray yet: the reconciler submits it, under the job's own uuid.
    reconciler = Reconciler(database=database, launcher=launcher)
    assert [s.action for s in reconciler.settle() if s.job_uuid == uuid] == ["submitted"]
    assert launcher.submit(uuid) is False  # Ray refuses a second run of the same job

    deadline = time.monotonic() + 180
    while (info := launcher.info(uuid)) is None or not info.state.is_terminal:
        assert time.monotonic() < deadline, f"Ray job {uuid} did not finish: {info}"
        time.sleep(1)
    assert info.state is RayJobState.FAILED
    status, error = _row(database, uuid)
    assert status is JobStatus.FAILED
    assert error is not None and "ValidationError" in error
    assert launcher.stop(uuid) is False  # already over: stopping is harmless


@pytest.mark.slow
def test_a_running_job_ray_never_heard_of_is_failed_as_vanished(
    database: Database, ray_jobs_url: str
) -> None:
    launcher = RayJobLauncher(ray_jobs_url, database_url=database.url)
    _job(database, "lost-1", JobStatus.RUNNING, {})
    Reconciler(database=database, launcher=launcher).settle()
    assert _row(database, "lost-1") == (JobStatus.FAILED, VANISHED)


def test_an_unreachable_jobs_api_is_a_clear_503_error() -> None:
    launcher = RayJobLauncher("http://127.0.0.1:9", database_url="sqlite://")
    with pytest.raises(RayJobsUnavailable, match=r"the Ray Jobs API at http://127\.0\.0\.1:9"):
        launcher.info("any")
    assert http_status_for(RayJobsUnavailable("x")) == 503
