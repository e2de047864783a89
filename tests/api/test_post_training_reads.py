"""Job status, logs and artifacts over HTTP come from the SQL store, in the spec's shape."""

from __future__ import annotations

from datetime import datetime

import pytest
from fastapi.testclient import TestClient

from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from tests.api.conftest import ALPHA, BETA

pytestmark = pytest.mark.integration


@pytest.fixture
def job(database: Database) -> str:
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid="ft-1", tenant="alpha", kind=JobKind.SUPERVISED_FINE_TUNE, request={"x": 1}
        )
    return "ft-1"


def status(client: TestClient, job_uuid: str, headers: dict[str, str] = ALPHA):
    return client.get("/post_training/job/status", params={"job_uuid": job_uuid}, headers=headers)


def test_a_scheduled_job(client: TestClient, job: str) -> None:
    body = status(client, job).json()
    assert body["job_uuid"] == job
    assert body["status"] == "scheduled"
    assert body["checkpoints"] == []
    assert datetime.fromisoformat(body["scheduled_at"]).tzinfo is not None
    assert "started_at" not in body and "completed_at" not in body


def test_a_running_job_with_logs_and_checkpoints(
    client: TestClient, database: Database, job: str
) -> None:
    with database.transaction() as session:
        store = JobStore(session)
        store.transition(
            job_key("alpha", job), to=JobStatus.RUNNING, resources_allocated={"num_workers": 2}
        )
        store.append_log(job_key("alpha", job), "step 1 loss 2.5", "step 2 loss 2.1")
        store.add_checkpoint(job_key("alpha", job), iters=2, path="/srv/ckpt/ft-1/2")
    body = status(client, job).json()
    assert body["status"] == "running"
    assert body["resources_allocated"] == {"num_workers": 2}
    assert body["checkpoints"] == [{"iters": 2, "path": "file:///srv/ckpt/ft-1/2"}]
    assert datetime.fromisoformat(body["started_at"]) >= datetime.fromisoformat(
        body["scheduled_at"]
    )
    logs = client.get("/post_training/job/logs", params={"job_uuid": job}, headers=ALPHA).json()
    assert logs == {"job_uuid": job, "log_lines": ["step 1 loss 2.5", "step 2 loss 2.1"]}
    artifacts = client.get(
        "/post_training/job/artifacts", params={"job_uuid": job}, headers=ALPHA
    ).json()
    assert artifacts == {
        "job_uuid": job,
        "checkpoints": [{"iters": 2, "path": "file:///srv/ckpt/ft-1/2"}],
    }


def test_a_cancelled_job_reads_failed_in_the_spec(
    client: TestClient, database: Database, job: str
) -> None:
    with database.transaction() as session:
        JobStore(session).transition(
            job_key("alpha", job), to=JobStatus.CANCELLED, error="cancelled by user"
        )
    body = status(client, job).json()
    assert body["status"] == "failed"
    assert "completed_at" in body


@pytest.mark.parametrize("path", ["status", "logs", "artifacts"])
def test_unknown_or_foreign_jobs_are_404(client: TestClient, job: str, path: str) -> None:
    url = f"/post_training/job/{path}"
    assert client.get(url, params={"job_uuid": "nope"}, headers=ALPHA).status_code == 404
    assert client.get(url, params={"job_uuid": job}, headers=BETA).status_code == 404
    assert client.get(url, headers=ALPHA).status_code == 422
