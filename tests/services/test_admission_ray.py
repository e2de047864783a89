"""Admission on the session's real Ray cluster, with jobs that hold resources: two Ray jobs
whose needs exceed the cluster together. The first is admitted and holds its CPUs (an
actor of its need, placed after the job marks itself running, as a training job's workers
are); the second stays `scheduled` with a reason, and Ray never hears of it, until the
first finishes; then the next pass admits it and it runs. Ray's own counts
(`ray.cluster_resources`, `ray.available_resources`) are what admission reads.

The jobs are a small holder script rather than a training recipe (the real launcher and
its recipes are tested elsewhere): a Train run costs 20-35 s, and what is under test is
the admission of resources, not training."""

from __future__ import annotations

import math
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.ray_jobs import RayJobInfo, RayJobState, submission_id
from corral.services.admission import Admitter, amount
from corral.services.jobs import JobsService
from corral.services.reconciler import PeriodicReconciler, Reconciler
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus
from corral.store.tables import Job
from corral.tenancy import job_key

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOLDER = textwrap.dedent(
    """
    import os, pathlib, sys, time

    import ray
    from corral.store.db import Database
    from corral.store.jobs import JobStatus, JobStore

    key, release = os.environ["HOLD_JOB_KEY"], pathlib.Path(os.environ["HOLD_RELEASE"])
    database = Database(os.environ["HOLD_DATABASE_URL"])
    with database.transaction() as session:  # as a recipe does, before its workers
        if not JobStore(session).transition(key, to=JobStatus.RUNNING).applied:
            sys.exit(1)
    ray.init(address="auto", log_to_driver=False)

    @ray.remote(num_cpus=float(os.environ["HOLD_CPUS"]))
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    while not release.exists():
        time.sleep(0.2)
    ray.kill(holder)
    with database.transaction() as session:
        JobStore(session).transition(key, to=JobStatus.COMPLETED)
    database.dispose()
    """
)


class HoldingLauncher:
    """A `JobLauncher` over Ray's Jobs API whose jobs run the holder script: each holds
    its row's need in CPUs until its release file appears."""

    def __init__(self, jobs_url: str, database: Database, directory: Path) -> None:
        from ray.job_submission import JobSubmissionClient

        self._client = JobSubmissionClient(jobs_url)
        self._database = database
        self.directory = directory
        self.script = directory / "holder.py"
        self.script.write_text(HOLDER)
        self.submitted: list[str] = []

    def release_file(self, key: str) -> Path:
        return self.directory / f"{key}.release"

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        with self._database.transaction() as session:
            job = session.get(Job, job_key)
            assert job is not None and job.need is not None
            cpus = job.need["CPU"]
        self._client.submit_job(
            entrypoint=f"{sys.executable} {self.script}",
            submission_id=submission_id(job_key, attempt),
            runtime_env={
                "env_vars": {
                    "HOLD_JOB_KEY": job_key,
                    "HOLD_RELEASE": str(self.release_file(job_key)),
                    "HOLD_DATABASE_URL": self._database.url,
                    "HOLD_CPUS": str(cpus),
                }
            },
        )
        self.submitted.append(job_key)
        return True

    def info(self, submission_id: str) -> RayJobInfo | None:
        try:
            details = self._client.get_job_info(submission_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc):
                return None
            raise
        return RayJobInfo(state=RayJobState(str(details.status)), message=details.message)

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self._client.stop_job(submission_id))
        except RuntimeError:
            return False


def _until(check: Callable[[], Any], what: str, *, timeout_s: float = 90) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.3)
    return value


@pytest.fixture
def launcher(
    ray_jobs_url: str, sqlite_database: Database, tmp_path: Path
) -> Iterator[HoldingLauncher]:
    holding = HoldingLauncher(ray_jobs_url, sqlite_database, tmp_path)
    yield holding
    for key in holding.submitted:  # never leave a holder behind on the shared cluster
        holding.release_file(key).touch()
        holding.stop(key)


def test_the_second_job_waits_with_a_reason_until_the_first_frees_the_cluster(
    ray_cluster: Any, sqlite_database: Database, launcher: HoldingLauncher
) -> None:
    import ray

    database = sqlite_database
    free = ray.available_resources().get("CPU", 0.0)
    if free < 1:
        pytest.skip(f"the session's cluster has {free} CPUs free")
    # Each fits alone; the two together do not.
    workers = min(math.floor(free), math.floor(free / 2) + 1)
    admitter = Admitter(
        database=database,
        launcher=launcher,
        totals=ray.cluster_resources,
        available=ray.available_resources,
    )
    jobs = JobsService(database=database, launcher=launcher, admitter=admitter)
    periodic = PeriodicReconciler(
        Reconciler(database=database, launcher=launcher), interval_s=60, admitter=admitter
    )
    run = uuid.uuid4().hex[:8]
    first, second = f"first-{run}", f"second-{run}"

    def submit(job_uuid: str) -> str:
        jobs.submit(
            tenant="alpha",
            job_uuid=job_uuid,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            body={"uuid": job_uuid},
            plan=lambda: {"num_workers": workers, "use_gpu": False},
        )
        return job_key("alpha", job_uuid)

    def row(key: str) -> Job:
        with database.transaction() as session:
            job = session.get(Job, key)
            assert job is not None
            return job

    first_key = submit(first)
    second_key = submit(second)
    assert launcher.submitted == [first_key]
    queued = jobs.get(tenant="alpha", job_uuid=second)
    assert (queued.status, queued.queue_position) == ("scheduled", 1)
    assert queued.queue_reason is not None
    assert queued.queue_reason.startswith(f"waiting for {workers} CPU; ")

    # The first runs and its CPUs are taken in Ray: the second still waits, pass after pass.
    _until(lambda: row(first_key).status == "running", "the first job runs")
    _until(
        lambda: ray.available_resources().get("CPU", 0.0) <= free - workers + 1e-6,
        "the first job's CPUs are placed",
    )
    for _ in range(3):
        periodic.run_once()
    assert row(second_key).admitted_at is None and launcher.info(second_key) is None
    assert jobs.get(tenant="alpha", job_uuid=second).queue_reason == (
        f"waiting for {workers} CPU; {amount(free - workers)} free"
    )

    # The first finishes: a pass settles it, frees its need and admits the second.
    launcher.release_file(first_key).touch()

    def admitted() -> bool:
        periodic.run_once()
        return row(second_key).admitted_at is not None

    _until(admitted, "the second job is admitted")
    assert JobStatus(row(first_key).status) is JobStatus.COMPLETED
    _until(lambda: row(second_key).status == "running", "the second job runs")
    launcher.release_file(second_key).touch()

    def settled() -> bool:
        periodic.run_once()
        return row(second_key).status == "completed"

    _until(settled, "the second job completes")
    log_lines = jobs.logs(tenant="alpha", job_uuid=second).log_lines
    assert log_lines[0].startswith(f"queued: waiting for {workers} CPU")
    assert log_lines[1] == f"admitted: needs {workers} CPU (it was queued)"
