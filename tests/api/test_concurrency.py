"""Concurrent submissions over real HTTP (uvicorn in a thread, many client threads), on
SQLite and PostgreSQL: the same job sent 50 times at once is stored once, reaches Ray
once (the real Ray Jobs API of the session cluster) and every caller gets the same
answer; 200 distinct jobs at once are each stored once and handed to the launcher once
(a recording launcher: 200 real drivers do not fit on this machine); the same dataset
created 50 times at once is stored once."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.job_submission import JobSubmissionClient
from sqlalchemy import func, select

from corral.config import Settings
from corral.ray_jobs import RayJobInfo
from corral.store.db import Database
from corral.store.tables import Dataset, Job
from corral.tenancy import job_key
from tests.api.conftest import ALPHA, training_app
from tests.api.live_server import live_server
from tests.api.training_requests import lora_sft_request
from tests.job_api import JobApi

pytestmark = pytest.mark.integration

SFT_PATH = "/post_training/supervised_fine_tune/"
TENANT = "alpha"  # the tenant of the ALPHA key (tests/api/conftest.API_KEYS)


def ray_submission_id(tenant: str, job_uuid: str) -> str:
    """The Ray submission id the launcher gives a job: its key."""
    return job_key(tenant, job_uuid)


class ThreadSafeRecordingLauncher:
    """A `JobLauncher` that counts how often each job was handed to it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submissions: Counter[str] = Counter()

    def submit(self, job_uuid: str, *, attempt: int = 0) -> bool:
        with self._lock:
            self.submissions[job_uuid] += 1
            return self.submissions[job_uuid] == 1

    def info(self, job_uuid: str) -> RayJobInfo | None:
        return None

    def stop(self, job_uuid: str) -> bool:
        return False


def data_url(rows: list[dict[str, Any]]) -> str:
    text = "".join(json.dumps(row) + "\n" for row in rows)
    return "data:application/jsonl;base64," + base64.b64encode(text.encode()).decode()


def _dialog(question: str, answer: str) -> dict[str, Any]:
    return {
        "dialog": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


DATASET = {
    "columns": {"dialog": "dialog"},
    "content_url": data_url([_dialog("hi", "hello"), _dialog("2+2?", "4")]),
    "metadata": {},
}


def sft_request(job_uuid: str) -> dict[str, Any]:
    return lora_sft_request(job_uuid, DATASET)


def all_at_once(base_url: str, calls: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, bytes]]:
    """POST every (path, body) from its own thread, released together by a barrier; the
    (status, body) of each answer, in the order given."""
    barrier = threading.Barrier(len(calls))
    limits = httpx.Limits(max_connections=len(calls), max_keepalive_connections=len(calls))
    with (
        httpx.Client(base_url=base_url, headers=ALPHA, timeout=120, limits=limits) as client,
        ThreadPoolExecutor(max_workers=len(calls)) as pool,
    ):

        def call(path: str, body: dict[str, Any]) -> tuple[int, bytes]:
            barrier.wait(timeout=60)
            response = client.post(path, json=body)
            return response.status_code, response.content

        futures = [pool.submit(call, path, body) for path, body in calls]
        return [future.result() for future in futures]


def _count(database: Database, column: Any, *where: Any) -> int:
    with database.transaction() as session:
        return int(session.scalar(select(func.count(column)).where(*where)) or 0)


def _until(what: str, check: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


@pytest.mark.slow
def test_fifty_concurrent_submissions_of_one_job_store_one_row_and_start_one_ray_job(
    settings: Settings,
    database: Database,
    demo_model_dir: Path,
    ray_jobs_url: str,
    job_api_for: Callable[..., JobApi],
) -> None:
    launcher = job_api_for(database).launcher(ray_jobs_url)
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=launcher)
    job_uuid = f"same-{database.backend}-{time.monotonic_ns()}"
    ray_id = ray_submission_id(TENANT, job_uuid)
    with live_server(app) as base_url:
        answers = all_at_once(base_url, [(SFT_PATH, sft_request(job_uuid))] * 50)
        try:
            assert set(answers) == {answers[0]}, Counter(status for status, _ in answers)
            assert answers[0][0] == 200, answers[0]
            assert _count(database, Job.uuid, Job.uuid == job_uuid) == 1
            with database.transaction() as session:
                # By (tenant, uuid), not by primary key: the key is the store's business.
                job = session.scalars(
                    select(Job).where(Job.tenant == TENANT, Job.uuid == job_uuid)
                ).one()
                assert job.launch is not None
                assert (job.tenant, len(job.launch["rows"])) == (TENANT, 2)
            ray_jobs = JobSubmissionClient(ray_jobs_url).list_jobs()
            assert [j.submission_id for j in ray_jobs].count(ray_id) == 1
        finally:
            # The job must not occupy the cluster: cancel it and wait until Ray says so.
            with httpx.Client(base_url=base_url, headers=ALPHA, timeout=60) as client:
                client.post("/post_training/job/cancel", json={"job_uuid": job_uuid})
            _until(
                f"Ray to stop {ray_id}",
                lambda: (info := launcher.info(ray_id)) is None or info.state.is_terminal,
                timeout_s=120,
            )


def test_two_hundred_distinct_concurrent_submissions_are_each_stored_and_launched_once(
    settings: Settings, database: Database, demo_model_dir: Path
) -> None:
    launcher = ThreadSafeRecordingLauncher()
    # No periodic reconciler pass during the burst: this recording launcher never knows a
    # job (info is None), so a pass would hand every row still `scheduled` to it again,
    # where Ray itself refuses a second submission under the same id. What is counted
    # here is the submit path, once per job.
    quiet = settings.model_copy(update={"reconcile_interval_s": 3600.0})
    app = training_app(quiet, database, model_dir=demo_model_dir, launcher=launcher)
    uuids = [f"many-{index}" for index in range(200)]
    with live_server(app) as base_url:
        answers = all_at_once(base_url, [(SFT_PATH, sft_request(uuid)) for uuid in uuids])
    assert Counter(status for status, _ in answers) == {200: 200}
    # Each handed to the launcher exactly once, under its key.
    assert launcher.submissions == Counter(ray_submission_id("alpha", u) for u in uuids)
    with database.transaction() as session:
        stored = Counter(session.scalars(select(Job.uuid)))
    assert stored == Counter(uuids)
    assert _count(database, Job.uuid, Job.launch.is_(None)) == 0


def test_fifty_concurrent_creates_of_one_dataset_store_one_row(
    settings: Settings, database: Database, demo_model_dir: Path
) -> None:
    app = training_app(
        settings, database, model_dir=demo_model_dir, launcher=ThreadSafeRecordingLauncher()
    )
    body = {"uuid": "shared", "dataset": DATASET}
    with live_server(app) as base_url:
        answers = all_at_once(base_url, [("/datasets/create", body)] * 50)
    assert set(answers) == {answers[0]} and answers[0][0] == 200, Counter(answers)
    with database.transaction() as session:
        (row,) = session.scalars(select(Dataset))
        assert (row.tenant, row.uuid, row.row_count) == (TENANT, "shared", 2)
