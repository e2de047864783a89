"""`corral jobs submit | status | logs | artifacts | metrics | list | cancel`: clients of a
running server's post-training API (`--url`, bearer key from CORRAL_API_KEY).

`submit` takes the spec's request body as a JSON file; an `algorithm` of `dpo` goes to
`/post_training/preference_optimize/`, anything else to `/post_training/supervised_fine_tune/`.
`--follow` draws a progress bar (steps done out of planned) until the job ends.
`logs`, `metrics`, `list` and `cancel` (and `status --follow`'s progress) go through the
routes of every kind (`/jobs/...`), so they serve generation jobs (`corral sdg`) too;
`status` and `artifacts` are the spec's post-training views.
"""

from __future__ import annotations

import json
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from corral.cli import remote
from corral.cli.output import JsonOption, fail, print_json, print_json_line, print_table

if TYPE_CHECKING:
    from corral.api.jobs import JobMetric, JobStatusName, JobSummary
    from corral.client import CorralClient


# The API's JobStatusName, spelled out: importing it would load pydantic for `--help`
# (tests/cli/test_jobs.py checks the two agree).
class JobStatusChoice(StrEnum):
    SCHEDULED = "scheduled"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATUS_STYLES = {
    "scheduled": "dim",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}

app = typer.Typer(help="fine-tuning jobs on a running server", no_args_is_help=True)

JobArgument = Annotated[str, typer.Argument(metavar="JOB", help="the job's uuid")]


@app.command()
def submit(
    request: Annotated[Path, typer.Argument(help="JSON file: the spec's request body")],
    follow: Annotated[bool, typer.Option(help="show progress until it ends")] = False,
    url: remote.UrlOption = remote.DEFAULT_URL,
    poll: remote.PollOption = 1.0,
    json_output: JsonOption = False,
) -> None:
    """Submit a fine-tuning (or DPO) request file."""
    try:
        body = json.loads(request.read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read the request {request}: {exc}")
    if not isinstance(body, dict):
        fail(f"{request} must hold a JSON object (the spec's request body)")
    with remote.connect(url) as client:
        submit_to = client.submit_dpo if body.get("algorithm") == "dpo" else client.submit_sft
        job_uuid = submit_to(body)
        if not json_output:
            print(f"submitted {job_uuid}")
        job = _follow(client, job_uuid, poll_s=poll, quiet=json_output) if follow else None
    if json_output:
        print_json({"job_uuid": job_uuid} if job is None else job)
    if job is not None:
        _fail_unless_completed(job)


@app.command()
def status(
    job_uuid: JobArgument,
    follow: Annotated[bool, typer.Option(help="redraw until the job ends")] = False,
    url: remote.UrlOption = remote.DEFAULT_URL,
    poll: remote.PollOption = 1.0,
    json_output: JsonOption = False,
) -> None:
    """A job's status (--follow: a live progress bar)."""
    from corral.job_progress import progress_line

    with remote.connect(url) as client:
        if follow:
            job = _follow(client, job_uuid, poll_s=poll, quiet=json_output)
            if json_output:
                print_json({"job": job, "status": client.job_status(job_uuid)})
            _fail_unless_completed(job)
            return
        spec_status = client.job_status(job_uuid)
        job = client.get_job(job_uuid)
    if json_output:
        print_json({"job": job, "status": spec_status})
    else:
        print(progress_line(job))
        print(json.dumps(spec_status.model_dump(mode="json", exclude_none=True), indent=2))


@app.command()
def logs(
    job_uuid: JobArgument,
    follow: Annotated[bool, typer.Option(help="print new lines until it ends")] = False,
    url: remote.UrlOption = remote.DEFAULT_URL,
    poll: remote.PollOption = 1.0,
    json_output: Annotated[
        bool, typer.Option("--json", help="one JSON string per line (JSON Lines)")
    ] = False,
) -> None:
    """A job's log lines."""
    from corral.client import TERMINAL_STATUSES

    with remote.connect(url) as client:
        seen = 0
        while True:
            lines = client.job_logs(job_uuid)
            for line in lines[seen:]:
                if json_output:
                    print_json_line(line)
                else:
                    print(line)
            seen = len(lines)
            if not follow or client.get_job(job_uuid).status in TERMINAL_STATUSES:
                return
            time.sleep(poll)


@app.command()
def artifacts(
    job_uuid: JobArgument,
    url: remote.UrlOption = remote.DEFAULT_URL,
    json_output: JsonOption = False,
) -> None:
    """A job's checkpoints."""
    with remote.connect(url) as client:
        found = client.job_artifacts(job_uuid)
    if json_output:
        print_json(found)
        return
    for checkpoint in found.checkpoints:
        print(f"{checkpoint.iters:>8}  {checkpoint.path}")


@app.command()
def metrics(
    job_uuid: JobArgument,
    after_step: Annotated[int | None, typer.Option(help="only steps after this one", min=0)] = None,
    url: remote.UrlOption = remote.DEFAULT_URL,
    json_output: JsonOption = False,
) -> None:
    """A job's per-step metrics (loss, learning rate, tokens/s, ...): a row per step."""
    with remote.connect(url) as client:
        records = list(client.job_metrics(job_uuid, after_step=after_step))
    if json_output:
        print_json({"job_uuid": job_uuid, "data": records})
    else:
        print_table(*metrics_table(records))


@app.command("list")
def list_jobs(
    status: Annotated[
        list[JobStatusChoice] | None,
        typer.Option(help="only jobs in this status (repeatable)"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    url: remote.UrlOption = remote.DEFAULT_URL,
    json_output: JsonOption = False,
) -> None:
    """Jobs, newest first."""
    with remote.connect(url) as client:
        wanted: list[JobStatusName] = [choice.value for choice in status or ()]
        page = client.list_jobs(status=wanted, limit=limit, offset=offset)
    if json_output:
        print_json(page)
        return
    print_table(*jobs_table(page.data), status_styles=STATUS_STYLES)
    if page.next_offset is not None:
        print(f"(more: --offset {page.next_offset})")


@app.command()
def cancel(
    job_uuid: JobArgument,
    url: remote.UrlOption = remote.DEFAULT_URL,
    json_output: JsonOption = False,
) -> None:
    """Cancel a job (stops its Ray job)."""
    with remote.connect(url) as client:
        job = client.cancel_job(job_uuid)
    if json_output:
        print_json(job)
    else:
        print(f"{job.job_uuid}: {job.status}")


def jobs_table(jobs: list[JobSummary]) -> tuple[list[str], list[list[str]]]:
    """A row per job; QUEUE is a queued job's place and why it waits (docs/admission.md)."""
    header = ["JOB", "KIND", "STATUS", "SCHEDULED", "CHECKPOINTS", "QUEUE", "ERROR"]
    rows = [
        [
            job.job_uuid,
            job.kind,
            job.status,
            job.scheduled_at.strftime("%Y-%m-%dT%H:%M:%S"),
            str(job.checkpoints),
            queue_text(job)[:60] or "-",
            (job.error or "-")[:60],
        ]
        for job in jobs
    ]
    return header, rows


def queue_text(job: JobSummary) -> str:
    """`#2 waiting for 2 GPU; 1 free` for a queued job; empty for any other."""
    if job.queue_reason is None:
        return ""
    place = f"#{job.queue_position} " if job.queue_position is not None else ""
    return place + job.queue_reason


def metrics_table(records: list[JobMetric]) -> tuple[list[str], list[list[str]]]:
    """STEP, EPOCH and a column per metric name, in the order the names first appear."""
    names = list(dict.fromkeys(name for record in records for name in record.values))
    header = ["STEP", "EPOCH", *(name.upper() for name in names)]
    rows = [
        [
            str(record.step),
            "-" if record.epoch is None else str(record.epoch),
            *(_number(record.values.get(name)) for name in names),
        ]
        for record in records
    ]
    return header, rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _follow(client: CorralClient, job_uuid: str, *, poll_s: float, quiet: bool) -> JobSummary:
    """Follow the job to its end, drawing progress on stdout (stderr under --json)."""
    from corral.job_progress import follow

    return follow(client, job_uuid, out=sys.stderr if quiet else sys.stdout, poll_s=poll_s)


def _fail_unless_completed(job: JobSummary) -> None:
    if job.status != "completed":
        fail(f"{job.job_uuid} ended {job.status}")
