"""`corral jobs metrics JOB` against a server stand-in (httpx's MockTransport) that
answers `GET /jobs/{job_uuid}/metrics` in the route's shape, a page at a time: the
table, `--json`, and a job the server does not know. (Against the real route, through
the whole jobs CLI: tests/api/test_fine_tuning_api.py.)"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from corral.api.jobs import JobMetric, JobStatusName
from corral.cli import CliError, jobs, output, remote, run
from corral.client import CorralClient

RECORDS: list[dict[str, Any]] = [
    {
        "step": 1,
        "epoch": 0,
        "recorded_at": "2026-12-01T12:00:01Z",
        "values": {"loss": 2.5, "learning_rate": 0.001},
    },
    {
        "step": 2,
        "epoch": 0,
        "recorded_at": "2026-12-01T12:00:02Z",
        "values": {"loss": 1.25, "learning_rate": 0.001, "tokens_per_s": 51.5},
    },
    {"step": 3, "epoch": None, "recorded_at": "2026-12-01T12:00:03Z", "values": {"loss": 0.5}},
]
PAGE = 2  # the stand-in's page size: three records take two pages


def metrics_route(request: httpx.Request) -> httpx.Response:
    prefix, job_uuid, suffix = request.url.path.split("/")[1:]
    assert (prefix, suffix) == ("jobs", "metrics")
    if job_uuid != "job-1":
        body = {"error": {"code": "not_found", "message": f"no job {job_uuid!r}"}}
        return httpx.Response(404, json=body)
    after = int(request.url.params.get("after_step", -1))
    page = [r for r in RECORDS if r["step"] > after][:PAGE]
    more = bool(page) and page[-1]["step"] < RECORDS[-1]["step"]
    next_after = page[-1]["step"] if more else None
    return httpx.Response(
        200, json={"job_uuid": job_uuid, "data": page, "next_after_step": next_after}
    )


@pytest.fixture(autouse=True)
def server(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = httpx.MockTransport(metrics_route)
    monkeypatch.setattr(remote, "connect", lambda url: CorralClient(url, transport=transport))


def test_a_row_per_step_a_column_per_metric(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["jobs", "metrics", "job-1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        ["STEP", "EPOCH", "LOSS", "LEARNING_RATE", "TOKENS_PER_S"],
        ["1", "0", "2.5", "0.001", "-"],
        ["2", "0", "1.25", "0.001", "51.5"],
        ["3", "-", "0.5", "-", "-"],
    ]
    assert run(["jobs", "metrics", "job-1", "--after-step", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["3", "-", "0.5"]


def test_json_holds_every_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["jobs", "metrics", "job-1", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["job_uuid"] == "job-1"
    assert [r["step"] for r in printed["data"]] == [1, 2, 3]
    assert printed["data"][1]["values"]["tokens_per_s"] == 51.5


def test_on_a_terminal_it_is_a_rich_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(output, "is_terminal", lambda: True)
    assert run(["jobs", "metrics", "job-1"]) == 0
    out = capsys.readouterr().out
    assert "LEARNING_RATE" in out and "51.5" in out
    plain = output.plain_table(*jobs.metrics_table([JobMetric(**r) for r in RECORDS]))
    assert out.rstrip("\n") != plain  # rich laid it out, not the plain printer


def test_an_unknown_job_is_the_servers_404() -> None:
    with pytest.raises(CliError, match="GET /jobs/other/metrics: 404 no job 'other'"):
        run(["jobs", "metrics", "other"])


def test_the_status_choices_are_the_apis() -> None:
    from typing import get_args

    assert [choice.value for choice in jobs.JobStatusChoice] == list(get_args(JobStatusName))
