"""`corral jobs list` and `corral jobs status` show a queued job's place and why it waits
(docs/admission.md), against a server stand-in (httpx's MockTransport) that answers in
the routes' shapes. (The routes themselves: tests/api/test_fine_tuning_api.py.)"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from corral.cli import remote, run
from corral.client import CorralClient

QUEUED: dict[str, Any] = {
    "job_uuid": "big-1",
    "kind": "supervised_fine_tune",
    "status": "scheduled",
    "scheduled_at": "2026-12-02T12:00:00Z",
    "attempt": 0,
    "checkpoints": 0,
    "need": {"GPU": 2.0},
    "queue_position": 1,
    "queue_reason": "waiting for 2 GPU; 1 free",
}
RUNNING: dict[str, Any] = QUEUED | {
    "job_uuid": "small-1",
    "status": "running",
    "admitted_at": "2026-12-02T11:59:00Z",
    "queue_position": None,
    "queue_reason": None,
}


def route(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/jobs":
        return httpx.Response(200, json={"data": [QUEUED, RUNNING], "next_offset": None})
    if path == "/jobs/big-1":
        return httpx.Response(200, json=QUEUED)
    if path == "/post_training/job/status":
        return httpx.Response(
            200,
            json={
                "job_uuid": "big-1",
                "status": "scheduled",
                "scheduled_at": QUEUED["scheduled_at"],
                "checkpoints": [],
                "resources_allocated": {"need": {"GPU": 2.0}, "queue_position": 1},
            },
        )
    return httpx.Response(404, json={"error": {"code": "not_found", "message": path}})


@pytest.fixture(autouse=True)
def server(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = httpx.MockTransport(route)
    monkeypatch.setattr(remote, "connect", lambda url: CorralClient(url, transport=transport))


def test_the_list_has_a_queue_column(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["jobs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "JOB",
        "KIND",
        "STATUS",
        "SCHEDULED",
        "CHECKPOINTS",
        "QUEUE",
        "ERROR",
    ]
    assert "#1 waiting for 2 GPU; 1 free" in lines[1] and lines[1].startswith("big-1")
    assert lines[2].split()[5] == "-"  # a running job is in no queue


def test_status_says_where_a_queued_job_is(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["jobs", "status", "big-1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.endswith("scheduled (queued #1: waiting for 2 GPU; 1 free)")
