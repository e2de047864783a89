"""Cancelling a running fine-tuning job through the API on a real Ray cluster: the Ray job
is stopped, its Train workers exit (their CPUs come back), the end state is recorded, and
neither a second cancel nor the reconciler changes it afterwards."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from ray.util.state import list_actors

from corral.config import Settings
from corral.demo import teaching_dialogs, teaching_request
from corral.ray_jobs import RayJobLauncher, RayJobState
from corral.services.reconciler import Reconciler
from corral.store.db import Database
from corral.tenancy import job_key
from tests.api.conftest import ALPHA, training_app
from tests.job_api import JobApi

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def launcher(
    ray_jobs_url: str, database: Database, job_api_for: Callable[..., JobApi]
) -> RayJobLauncher:
    return job_api_for(database).launcher(ray_jobs_url)


@pytest.fixture
def client(
    settings: Settings, database: Database, launcher: RayJobLauncher, demo_model_dir: Path
) -> Iterator[TestClient]:
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _train_workers() -> list[Any]:
    """The live Ray Train worker actors in the cluster (this module's job is the only
    training job the session runs at the time)."""
    return list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        detail=True,
        raise_on_missing_output=False,
    )


def _until(what: str, check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_cancel_stops_the_ray_job_frees_its_workers_and_stays_cancelled(
    client: TestClient, database: Database, launcher: RayJobLauncher, dataset_root: Path
) -> None:
    teach = dataset_root / "teach.jsonl"
    teach.write_text("".join(json.dumps({"dialog": d}) + "\n" for d in teaching_dialogs()))
    dataset = {"columns": {"dialog": "dialog"}, "content_url": teach.as_uri(), "metadata": {}}
    job_uuid = f"cancel-{time.monotonic_ns()}"
    request = teaching_request(job_uuid, dataset, dataset)
    request["training_config"]["n_epochs"] = 50  # far longer than the test waits
    # Counted by the job's own Train workers: Serve replicas of other tests in this
    # session's cluster come and go meanwhile, so free CPUs say nothing about this job.
    assert _train_workers() == []

    response = client.post("/post_training/supervised_fine_tune/", json=request, headers=ALPHA)
    assert response.status_code == 200, response.text

    def training() -> bool:
        job = client.get("/post_training/job", params={"job_uuid": job_uuid}, headers=ALPHA).json()
        return (job.get("progress") or {}).get("step", 0) >= 1

    _until("the first step", training, timeout_s=300)
    workers = _train_workers()
    assert len(workers) == 2, workers  # the request's two workers, one CPU each
    # Placed in the job's placement group: the CPU they hold is named after its bundle.
    held = [{k: v for k, v in w.required_resources.items() if k.startswith("CPU")} for w in workers]
    assert all(sum(cpus.values()) >= 1 for cpus in held), held

    cancel = client.post("/post_training/job/cancel", json={"job_uuid": job_uuid}, headers=ALPHA)
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["status"] == "cancelled"

    def stopped() -> bool:
        info = launcher.info(job_key("alpha", job_uuid))
        return info is not None and info.state is RayJobState.STOPPED

    _until("Ray to stop the job", stopped, timeout_s=120)
    _until("the Train workers to exit", lambda: _train_workers() == [], timeout_s=120)

    again = client.post("/post_training/job/cancel", json={"job_uuid": job_uuid}, headers=ALPHA)
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    Reconciler(database=database, launcher=launcher).settle()  # Ray says STOPPED: no change
    summary = client.get("/post_training/job", params={"job_uuid": job_uuid}, headers=ALPHA)
    assert (summary.json()["status"], summary.json()["error"]) == ("cancelled", "cancelled")
    logs = client.get("/post_training/job/logs", params={"job_uuid": job_uuid}, headers=ALPHA)
    assert "cancelled on request" in logs.json()["log_lines"]
