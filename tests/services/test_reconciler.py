"""The reconciler settles unfinished jobs against what Ray says, on both database backends;
and the Ray Jobs launcher it talks to, against a real local cluster."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from corral.errors import http_status_for
from corral.job_tokens import JobTokens
from corral.ray_jobs import (
    RayJobInfo,
    RayJobLauncher,
    RayJobState,
    RayJobsUnavailable,
    submission_id,
)
from corral.services.jobs import JobsService
from corral.services.reconciler import MAX_RELAUNCHES, VANISHED, Reconciler
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.store.tables import Job
from tests.job_api import JobApi

pytestmark = pytest.mark.integration


class ScriptedLauncher:
    """A `JobLauncher` whose Ray answers are set by the test. `before_info`, if set, runs
    before each answer (to change the store behind the reconciler's back)."""

    def __init__(self, states: dict[str, RayJobInfo]) -> None:
        self.states = states
        self.submitted: list[str] = []
        self.stopped: list[str] = []
        self.before_info: Callable[[str], None] | None = None

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        run_id = submission_id(job_key, attempt)
        self.submitted.append(run_id)
        self.states[run_id] = RayJobInfo(RayJobState.PENDING)
        return True

    def info(self, job_key: str) -> RayJobInfo | None:
        if self.before_info is not None:
            self.before_info(job_key)
        return self.states.get(job_key)

    def stop(self, job_key: str) -> bool:
        self.stopped.append(job_key)
        return job_key in self.states and not self.states[job_key].state.is_terminal


def _job(
    database: Database,
    uuid: str,
    status: JobStatus,
    launch: dict[str, object],
    *,
    tenant: str = "t",
    kind: JobKind = JobKind.SUPERVISED_FINE_TUNE,
) -> str:
    """Store a job in `status`; returns its key."""
    with database.transaction() as session:
        store = JobStore(session)
        key = store.create(
            job_uuid=uuid,
            tenant=tenant,
            kind=kind,
            request={"uuid": uuid},
            launch=launch,
        ).job.key
        if status is not JobStatus.SCHEDULED:
            store.transition(key, to=JobStatus.RUNNING)
        if status.is_terminal:
            store.transition(key, to=status)
        return key


def _row(database: Database, key: str) -> tuple[JobStatus, str | None]:
    with database.transaction() as session:
        job = session.get(Job, key)
        assert job is not None
        return JobStatus(job.status), job.error


def _stop_pending(database: Database, key: str) -> bool:
    with database.transaction() as session:
        job = session.get(Job, key)
        assert job is not None
        return job.stop_pending


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
    # Finished between the store snapshot and the Ray query: settled through running.
    (JobStatus.SCHEDULED, RayJobState.SUCCEEDED, JobStatus.COMPLETED, "completed"),
    (JobStatus.SCHEDULED, RayJobState.STOPPED, JobStatus.CANCELLED, "cancelled"),
]


@pytest.mark.parametrize("kind", [JobKind.SUPERVISED_FINE_TUNE, JobKind.PREFERENCE_OPTIMIZE])
def test_every_unfinished_job_gets_what_ray_says(database: Database, kind: JobKind) -> None:
    """The same for every kind that is not relaunched after a crash (a generation job is:
    see the tests below, which it shares every other case with)."""
    states: dict[str, RayJobInfo] = {}
    keys = []
    for index, (row, ray_state, _, _) in enumerate(CASES):
        keys.append(_job(database, f"job-{index}", row, {}, kind=kind))
        if ray_state is not None:
            states[keys[-1]] = RayJobInfo(ray_state, message="driver exited with code 1")
    launcher = ScriptedLauncher(states)

    settled = {
        s.job_key: s.action for s in Reconciler(database=database, launcher=launcher).settle()
    }

    for key, (_, _, after, action) in zip(keys, CASES, strict=True):
        assert settled.get(key) == action, key
        assert _row(database, key)[0] is after, key
    assert launcher.submitted == [keys[0]]
    assert launcher.stopped == []  # a cancelled row without a pending stop is left alone
    assert _row(database, keys[1]) == (JobStatus.FAILED, VANISHED)
    assert _row(database, keys[5])[1] == "the Ray job failed: driver exited with code 1"
    # A second pass finds nothing new to do: the one it submitted is now pending in Ray.
    again = Reconciler(database=database, launcher=launcher).settle()
    assert {s.action for s in again} == {"left"}
    assert launcher.submitted == [keys[0]]


GENERATION = JobKind.SYNTHETIC_DATA_GENERATION


def _attempt(database: Database, key: str) -> int:
    with database.transaction() as session:
        job = session.get(Job, key)
        assert job is not None
        return job.attempt


@pytest.mark.parametrize(
    ("ray_state", "reason"),
    [(None, VANISHED), (RayJobState.FAILED, "the Ray job failed: driver killed")],
)
def test_a_generation_job_whose_process_died_is_relaunched_as_its_next_attempt(
    database: Database, ray_state: RayJobState | None, reason: str
) -> None:
    """Still `running` in its row, but its Ray job failed or vanished: the process died
    without reporting. The job resumes from its saved batches as attempt 1, a Ray job
    of its own (the first one's id is taken); the next pass leaves it to run."""
    key = _job(database, "gen", JobStatus.RUNNING, {}, kind=GENERATION)
    states = {} if ray_state is None else {key: RayJobInfo(ray_state, message="driver killed")}
    launcher = ScriptedLauncher(states)

    settled = Reconciler(database=database, launcher=launcher).settle()

    assert [(s.job_key, s.action) for s in settled] == [(key, "relaunched")]
    assert _row(database, key)[0] is JobStatus.SCHEDULED and _attempt(database, key) == 1
    assert launcher.submitted == [f"{key}~1"]
    with database.transaction() as session:
        lines = [line.line for line in JobStore(session).log_lines(key)]
    assert any(reason in line and "attempt 1 resumes" in line for line in lines), lines
    again = Reconciler(database=database, launcher=launcher).settle()
    assert [s.action for s in again] == ["left"]


def test_a_relaunch_ray_refuses_is_submitted_by_the_next_pass(database: Database) -> None:
    key = _job(database, "gen", JobStatus.RUNNING, {}, kind=GENERATION)
    launcher = ScriptedLauncher({key: RayJobInfo(RayJobState.FAILED)})

    def unreachable(job_key: str, *, attempt: int = 0) -> bool:
        raise RayJobsUnavailable("the Ray Jobs API at http://head:8265: connection refused")

    launcher.submit = unreachable  # type: ignore[method-assign]
    with pytest.raises(RayJobsUnavailable):
        Reconciler(database=database, launcher=launcher).settle()
    assert _row(database, key)[0] is JobStatus.SCHEDULED and _attempt(database, key) == 1

    del launcher.submit  # Ray answers again
    settled = Reconciler(database=database, launcher=launcher).settle()
    assert [s.action for s in settled] == ["submitted"]
    assert launcher.submitted == [f"{key}~1"]


def test_a_generation_job_is_relaunched_at_most_max_relaunches_times(database: Database) -> None:
    key = _job(database, "gen", JobStatus.RUNNING, {}, kind=GENERATION)
    launcher = ScriptedLauncher({key: RayJobInfo(RayJobState.FAILED, message="killed")})
    reconciler = Reconciler(database=database, launcher=launcher)
    for attempt in range(1, MAX_RELAUNCHES + 1):
        assert [s.action for s in reconciler.settle()] == ["relaunched"]
        # The attempt starts, then its process dies too.
        with database.transaction() as session:
            JobStore(session).transition(key, to=JobStatus.RUNNING)
        launcher.states[submission_id(key, attempt)] = RayJobInfo(RayJobState.FAILED)

    assert [s.action for s in reconciler.settle()] == ["failed"]
    assert _row(database, key) == (JobStatus.FAILED, "the Ray job failed: no message")
    assert _attempt(database, key) == MAX_RELAUNCHES


def test_a_relaunched_job_is_cancelled_and_stopped_under_its_attempts_id(
    database: Database,
) -> None:
    key = _job(database, "gen", JobStatus.RUNNING, {}, kind=GENERATION)
    launcher = ScriptedLauncher({key: RayJobInfo(RayJobState.FAILED)})
    Reconciler(database=database, launcher=launcher).settle()
    with database.transaction() as session:
        JobStore(session).transition(key, to=JobStatus.RUNNING)
    launcher.states[f"{key}~1"] = RayJobInfo(RayJobState.RUNNING)

    JobsService(database=database, launcher=launcher).cancel(tenant="t", job_uuid="gen")

    assert launcher.stopped == [f"{key}~1"]


def test_a_generation_job_that_failed_by_itself_is_not_relaunched(database: Database) -> None:
    """Its row says failed (the job recorded why): nothing is unsettled."""
    key = _job(database, "gen", JobStatus.FAILED, {}, kind=GENERATION)
    launcher = ScriptedLauncher({key: RayJobInfo(RayJobState.FAILED)})
    assert Reconciler(database=database, launcher=launcher).settle() == []
    assert launcher.submitted == []


def test_jobs_are_submitted_under_their_key_so_tenants_may_share_a_uuid(
    database: Database,
) -> None:
    alpha = _job(database, "same", JobStatus.SCHEDULED, {}, tenant="alpha")
    beta = _job(database, "same", JobStatus.SCHEDULED, {}, tenant="beta")
    assert alpha != beta
    launcher = ScriptedLauncher({})
    Reconciler(database=database, launcher=launcher).settle()
    assert sorted(launcher.submitted) == sorted([alpha, beta])


def test_a_job_that_reports_between_snapshot_and_ray_query_is_stale_not_an_error(
    database: Database,
) -> None:
    """The row is read as scheduled; before Ray is asked, the job runs to completion and
    writes so itself. The reconciler's move is refused as stale and nothing is raised."""
    key = _job(database, "racer", JobStatus.SCHEDULED, {})
    other = _job(database, "bystander", JobStatus.RUNNING, {})
    launcher = ScriptedLauncher(
        {
            key: RayJobInfo(RayJobState.SUCCEEDED),
            other: RayJobInfo(RayJobState.FAILED, message="oom"),
        }
    )

    def job_reports(asked: str) -> None:
        if asked == key and _row(database, key)[0] is JobStatus.SCHEDULED:
            with database.transaction() as session:
                JobStore(session).transition(key, to=JobStatus.RUNNING)
                JobStore(session).transition(key, to=JobStatus.COMPLETED)

    launcher.before_info = job_reports
    settled = {
        s.job_key: s.action for s in Reconciler(database=database, launcher=launcher).settle()
    }
    assert settled == {key: "stale", other: "failed"}
    assert _row(database, key) == (JobStatus.COMPLETED, None)


def test_one_row_that_cannot_be_settled_does_not_stop_the_others(database: Database) -> None:
    broken = _job(database, "broken", JobStatus.RUNNING, {})
    fine = _job(database, "fine", JobStatus.RUNNING, {})
    launcher = ScriptedLauncher({fine: RayJobInfo(RayJobState.SUCCEEDED)})

    def fail_for_broken(asked: str) -> None:
        if asked == broken:
            raise ValueError("a bug in reading this row")

    launcher.before_info = fail_for_broken
    settled = {
        s.job_key: s.action for s in Reconciler(database=database, launcher=launcher).settle()
    }
    assert settled == {broken: "error: ValueError", fine: "completed"}
    assert _row(database, broken)[0] is JobStatus.RUNNING


def test_ray_unreachable_ends_the_pass_with_a_backend_error(database: Database) -> None:
    _job(database, "waiting", JobStatus.SCHEDULED, {})
    launcher = ScriptedLauncher({})

    def unreachable(_: str) -> None:
        raise RayJobsUnavailable("the Ray Jobs API at http://127.0.0.1:9: refused")

    launcher.before_info = unreachable
    with pytest.raises(RayJobsUnavailable):
        Reconciler(database=database, launcher=launcher).settle()


def test_a_pending_stop_is_retried_until_ray_says_the_job_ended(database: Database) -> None:
    """Cancelled while Ray was unreachable: the row says cancelled with a pending stop. The
    reconciler stops the Ray job while it is alive, and clears the stop once it ended.
    A job that completed itself (still shutting down in Ray) is never stopped."""
    cancelled = _job(database, "cancelled", JobStatus.CANCELLED, {})
    completed = _job(database, "completed", JobStatus.COMPLETED, {})
    with database.transaction() as session:
        JobStore(session).set_stop_pending(cancelled, True)
    launcher = ScriptedLauncher(
        {
            cancelled: RayJobInfo(RayJobState.RUNNING),
            completed: RayJobInfo(RayJobState.RUNNING),
        }
    )
    reconciler = Reconciler(database=database, launcher=launcher)

    assert [(s.job_key, s.action) for s in reconciler.settle()] == [(cancelled, "stopped")]
    assert launcher.stopped == [cancelled]
    assert _stop_pending(database, cancelled)  # until Ray confirms

    launcher.states[cancelled] = RayJobInfo(RayJobState.STOPPED)
    assert [(s.job_key, s.action) for s in reconciler.settle()] == [(cancelled, "stop confirmed")]
    assert not _stop_pending(database, cancelled)
    assert reconciler.settle() == []
    assert launcher.stopped == [cancelled]
    assert _row(database, cancelled)[0] is JobStatus.CANCELLED


@pytest.mark.slow
def test_cancelling_a_generation_job_stops_its_ray_job(database: Database) -> None:
    key = _job(database, "gen", JobStatus.RUNNING, {}, kind=JobKind.SYNTHETIC_DATA_GENERATION)
    launcher = ScriptedLauncher({key: RayJobInfo(RayJobState.RUNNING)})
    summary = JobsService(database=database, launcher=launcher).cancel(tenant="t", job_uuid="gen")
    assert summary.status == "cancelled" and summary.kind == "synthetic_data_generation"
    assert launcher.stopped == [key]
    # Ray reports it stopped: the reconciler confirms the stop and leaves the row cancelled.
    launcher.states[key] = RayJobInfo(RayJobState.STOPPED)
    settled = Reconciler(database=database, launcher=launcher).settle()
    assert [s.action for s in settled] == ["stop confirmed"]
    assert _row(database, key) == (JobStatus.CANCELLED, "cancelled")


def test_the_ray_launcher_runs_the_fixed_entrypoint_which_reports_to_the_store(
    database: Database, ray_jobs_url: str, job_api_for: Callable[..., JobApi]
) -> None:
    """A job whose launch config cannot run: the real entrypoint starts under Ray, records
    the failure in the store and exits non-zero, so Ray's view agrees with the row."""
    launcher = job_api_for(database).launcher(ray_jobs_url)
    key = _job(database, f"broken-{time.monotonic_ns()}", JobStatus.SCHEDULED, {"n_epochs": 0})
    assert launcher.info(key) is None

    # Nothing in Ray yet: the reconciler submits it, under the job's own key.
    reconciler = Reconciler(database=database, launcher=launcher)
    assert [s.action for s in reconciler.settle() if s.job_key == key] == ["submitted"]
    assert launcher.submit(key) is False  # Ray refuses a second run of the same job

    deadline = time.monotonic() + 180
    while (info := launcher.info(key)) is None or not info.state.is_terminal:
        assert time.monotonic() < deadline, f"Ray job {key} did not finish: {info}"
        time.sleep(1)
    assert info.state is RayJobState.FAILED
    status, error = _row(database, key)
    assert status is JobStatus.FAILED
    assert error is not None and "ValidationError" in error
    assert launcher.stop(key) is False  # already over: stopping is harmless


def test_a_relaunched_attempt_runs_under_its_own_ray_id_as_the_same_job(
    database: Database, ray_jobs_url: str, job_api_for: Callable[..., JobApi]
) -> None:
    """A generation job whose Ray job vanished is relaunched as `KEY~1` on the real
    cluster; that run is the same job (the entrypoint reads the row by its key) and
    reports to it: here its launch config cannot run, so it records its own failure."""
    launcher = job_api_for(database).launcher(ray_jobs_url)
    key = _job(database, f"gen-{time.monotonic_ns()}", JobStatus.RUNNING, {}, kind=GENERATION)

    settled = Reconciler(database=database, launcher=launcher).settle()

    assert [s.action for s in settled if s.job_key == key] == ["relaunched"]
    run_id = submission_id(key, 1)
    deadline = time.monotonic() + 180
    while (info := launcher.info(run_id)) is None or not info.state.is_terminal:
        assert time.monotonic() < deadline, f"Ray job {run_id} did not finish: {info}"
        time.sleep(1)
    assert info.state is RayJobState.FAILED
    status, error = _row(database, key)
    assert status is JobStatus.FAILED and error is not None and "ValidationError" in error
    assert _attempt(database, key) == 1
    assert launcher.info(key) is None  # the first attempt's id was never used again


@pytest.mark.slow
def test_a_running_job_ray_never_heard_of_is_failed_as_vanished(
    database: Database, ray_jobs_url: str, job_api_for: Callable[..., JobApi]
) -> None:
    launcher = job_api_for(database).launcher(ray_jobs_url)
    key = _job(database, f"lost-{time.monotonic_ns()}", JobStatus.RUNNING, {})
    Reconciler(database=database, launcher=launcher).settle()
    assert _row(database, key) == (JobStatus.FAILED, VANISHED)


def test_an_unreachable_jobs_api_is_a_clear_503_error() -> None:
    launcher = RayJobLauncher(
        "http://127.0.0.1:9", internal_url="http://127.0.0.1:9", tokens=JobTokens(b"s" * 32)
    )
    with pytest.raises(RayJobsUnavailable, match=r"the Ray Jobs API at http://127\.0\.0\.1:9"):
        launcher.info("any")
    assert http_status_for(RayJobsUnavailable("x")) == 503
