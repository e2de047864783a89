"""Corral's job routes over HTTP on both backends: /jobs for every kind (kind and status
filters, one job, its logs, its metrics in pages, cancel) and the post-training ones,
which show post-training jobs only. Jobs are stored and reported the way the job
process does it (JobStore, JobReporter); no Ray."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.store.db import Database
from corral.store.jobs import JobKind, JobStore
from corral.tenancy import job_key
from jobs.reporting import JobReporter
from jobs.transport import DatabaseTransport
from tests.api.conftest import ALPHA, BETA

pytestmark = pytest.mark.integration


@pytest.fixture
def jobs(database: Database) -> dict[str, str]:
    """Alpha's fine-tuning job `ft` (planned, five steps recorded) and generation job
    `gen`; the uuid of each kind."""
    with database.transaction() as session:
        store = JobStore(session)
        store.create(job_uuid="ft", tenant="alpha", kind=JobKind.SUPERVISED_FINE_TUNE, request={})
        store.create(
            job_uuid="gen", tenant="alpha", kind=JobKind.SYNTHETIC_DATA_GENERATION, request={}
        )
    reporter = JobReporter(DatabaseTransport(database, job_key("alpha", "ft")))
    reporter.started(resources_allocated={})
    reporter.plan(total_steps=10)
    reporter.metrics(step=0, epoch=0, validation_loss=3.0)
    for step in range(1, 6):
        reporter.metrics(step=step, epoch=1, loss=3.0 - step / 4, learning_rate=1e-3)
        reporter.log(f"step {step}")
    return {"training": "ft", "generation": "gen"}


def _get(client: TestClient, path: str, headers: dict[str, str] = ALPHA, **params: Any) -> Any:
    response = client.get(path, params=params, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def _uuids(body: dict[str, Any]) -> list[str]:
    return sorted(job["job_uuid"] for job in body["data"])


def test_jobs_of_every_kind_and_post_training_ones(
    client: TestClient, jobs: dict[str, str]
) -> None:
    assert _uuids(_get(client, "/jobs")) == ["ft", "gen"]
    assert _uuids(_get(client, "/jobs", kind="synthetic_data_generation")) == ["gen"]
    both = _get(client, "/jobs", kind=["supervised_fine_tune", "synthetic_data_generation"])
    assert _uuids(both) == ["ft", "gen"]
    assert _uuids(_get(client, "/jobs", status="running")) == ["ft"]
    assert _uuids(_get(client, "/post_training/jobs")) == ["ft"]
    assert _get(client, "/jobs", BETA)["data"] == []
    assert client.get("/jobs", params={"kind": "sft"}, headers=ALPHA).status_code == 422

    summary = _get(client, "/jobs/ft")
    assert summary == _get(client, "/post_training/job", job_uuid="ft")
    assert summary["progress"] == {"step": 5, "total_steps": 10, "loss": 1.75}
    # The list shows each job's progress too (the dashboard's table reads it there).
    listed = {job["job_uuid"]: job for job in _get(client, "/jobs")["data"]}
    assert listed["ft"]["progress"] == summary["progress"]
    assert listed["gen"]["progress"] == _get(client, "/jobs/gen")["progress"]
    assert _get(client, "/jobs/gen")["kind"] == "synthetic_data_generation"
    # A job of another kind is not a post-training job.
    for path in ("/post_training/job", "/post_training/job/metrics", "/post_training/job/logs"):
        assert client.get(path, params={"job_uuid": "gen"}, headers=ALPHA).status_code == 404

    logs = _get(client, "/jobs/ft/logs")
    assert logs["job_uuid"] == "ft" and logs["log_lines"][-1] == "step 5"


@pytest.mark.parametrize("path", ["/jobs/ft/metrics", "/post_training/job/metrics"])
def test_metrics_come_in_pages_of_steps(
    client: TestClient, jobs: dict[str, str], path: str
) -> None:
    params = {"job_uuid": "ft"} if path.startswith("/post_training") else {}
    everything = _get(client, path, **params)
    assert everything["job_uuid"] == "ft" and everything["next_after_step"] is None
    assert [(m["step"], m["epoch"]) for m in everything["data"]] == [
        (s, min(s, 1)) for s in range(6)
    ]
    assert everything["data"][0]["values"] == {"validation_loss": 3.0}
    assert everything["data"][5]["values"] == {"loss": 1.75, "learning_rate": 1e-3}

    steps: list[int] = []
    after: int | None = None
    pages = 0
    while True:
        page = _get(
            client, path, **params, limit=2, **({} if after is None else {"after_step": after})
        )
        steps += [m["step"] for m in page["data"]]
        pages += 1
        after = page["next_after_step"]
        if after is None:
            break
    assert steps == list(range(6)) and pages == 3
    for bad in ({"limit": 0}, {"limit": 10_001}, {"after_step": -1}):
        assert client.get(path, params=params | bad, headers=ALPHA).status_code == 422


def test_cancel_by_path_and_404s_for_what_is_not_yours(
    client: TestClient, jobs: dict[str, str]
) -> None:
    for path in ("/jobs/ft", "/jobs/ft/logs", "/jobs/ft/metrics"):
        assert client.get(path, headers=BETA).status_code == 404
        assert client.get(path.replace("ft", "nope"), headers=ALPHA).status_code == 404
    assert client.post("/jobs/ft/cancel", headers=BETA).status_code == 404
    cancelled = client.post("/jobs/gen/cancel", headers=ALPHA)
    assert cancelled.status_code == 200, cancelled.text
    assert (cancelled.json()["status"], cancelled.json()["stop_pending"]) == ("cancelled", True)
    assert (
        client.post(
            "/post_training/job/cancel", json={"job_uuid": "gen"}, headers=ALPHA
        ).status_code
        == 404
    )
    # Path ids are held to the same rules as query ids.
    assert client.get(f"/jobs/{'x' * 129}", headers=ALPHA).status_code == 422
    assert client.get("/jobs/%01bad", headers=ALPHA).status_code == 422
