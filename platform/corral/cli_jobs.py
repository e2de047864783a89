"""`corral jobs submit | status | logs | artifacts | list | cancel`: clients of a running
server's post-training API (`--url`, bearer key from `CORRAL_API_KEY`).

`submit` takes the spec's request body as a JSON file; an `algorithm` of `dpo` goes to
`/post_training/preference_optimize/`, anything else to `/post_training/supervised_fine_tune/`.
`status --follow` draws a progress bar (steps done out of planned) until the job ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import httpx

from corral.cli_models import (
    ApiCommandError,
    add_connection_options,
    call_api,
    client_from_args,
    fail,
    run_or_fail,
)
from corral.config import Settings

TERMINAL = frozenset({"completed", "failed", "cancelled"})
BAR_WIDTH = 30


def submit_job(client: httpx.Client, request: dict[str, Any]) -> str:
    path = (
        "/post_training/preference_optimize/"
        if request.get("algorithm") == "dpo"
        else "/post_training/supervised_fine_tune/"
    )
    call_api(client, "POST", path, json=request)
    return str(request.get("job_uuid"))


def job_summary(client: httpx.Client, job_uuid: str) -> dict[str, Any]:
    return call_api(client, "GET", "/post_training/job", params={"job_uuid": job_uuid})


def progress_line(job: dict[str, Any]) -> str:
    """One line: a bar of steps done out of planned (when known), the loss, the status."""
    progress = job.get("progress") or {}
    step, total = progress.get("step", 0), progress.get("total_steps")
    if total:
        filled = min(BAR_WIDTH, round(BAR_WIDTH * step / total))
        bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {step}/{total} steps"
    else:
        bar = f"[{'?' * BAR_WIDTH}] {step} steps"
    loss = progress.get("loss")
    tail = f"  loss {loss:.4f}" if loss is not None else ""
    return f"{job['job_uuid']} {bar}{tail}  {job['status']}"


def follow(
    client: httpx.Client,
    job_uuid: str,
    *,
    out: TextIO,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Redraw the progress line until the job ends; returns its last summary. On a
    terminal the line is redrawn in place, otherwise a line is printed when it changes."""
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    live = out.isatty()
    last = ""
    while True:
        job = job_summary(client, job_uuid)
        line = progress_line(job)
        if live:
            out.write(f"\r{line}\x1b[K")
            out.flush()
        elif line != last:
            out.write(line + "\n")
        last = line
        if job["status"] in TERMINAL:
            if live:
                out.write("\n")
            if job.get("error"):
                out.write(f"{job_uuid}: {job['error']}\n")
            return job
        if deadline is not None and time.monotonic() > deadline:
            raise ApiCommandError(f"{job_uuid} still {job['status']} after {timeout_s:g} s")
        time.sleep(poll_s)


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    header = ("JOB", "KIND", "STATUS", "SCHEDULED", "CHECKPOINTS", "ERROR")
    rows = [header] + [
        (
            job["job_uuid"],
            job["kind"],
            job["status"],
            job["scheduled_at"][:19],
            str(job["checkpoints"]),
            (job.get("error") or "-")[:60],
        )
        for job in jobs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)), row[-1]])
        for row in rows
    )


# ------------------------------------------------------------------ argparse


def cmd_submit(_settings: Settings, args: argparse.Namespace) -> None:
    try:
        request = json.loads(Path(args.request).read_text())
    except (OSError, ValueError) as exc:
        fail(f"cannot read the request {args.request}: {exc}")
    if not isinstance(request, dict):
        fail(f"{args.request} must hold a JSON object (the spec's request body)")
    with client_from_args(args) as client:
        job_uuid = run_or_fail(submit_job, client, request)
        print(f"submitted {job_uuid}")
        if args.follow:
            _follow_and_report(client, job_uuid, args)


def cmd_status(_settings: Settings, args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
        if args.follow:
            _follow_and_report(client, args.job_uuid, args)
            return
        status = run_or_fail(
            call_api, client, "GET", "/post_training/job/status", params={"job_uuid": args.job_uuid}
        )
        summary = run_or_fail(job_summary, client, args.job_uuid)
        print(progress_line(summary))
        print(json.dumps(status, indent=2))


def cmd_logs(_settings: Settings, args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
        seen = 0
        while True:
            logs = run_or_fail(
                call_api,
                client,
                "GET",
                "/post_training/job/logs",
                params={"job_uuid": args.job_uuid},
            )
            for line in logs["log_lines"][seen:]:
                print(line)
            seen = len(logs["log_lines"])
            if (
                not args.follow
                or run_or_fail(job_summary, client, args.job_uuid)["status"] in TERMINAL
            ):
                return
            time.sleep(args.poll)


def cmd_artifacts(_settings: Settings, args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
        artifacts = run_or_fail(
            call_api,
            client,
            "GET",
            "/post_training/job/artifacts",
            params={"job_uuid": args.job_uuid},
        )
    for checkpoint in artifacts["checkpoints"]:
        print(f"{checkpoint['iters']:>8}  {checkpoint['path']}")


def cmd_list(_settings: Settings, args: argparse.Namespace) -> None:
    params: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
    if args.status:
        params["status"] = args.status
    with client_from_args(args) as client:
        page = run_or_fail(call_api, client, "GET", "/post_training/jobs", params=params)
    print(format_jobs(page["data"]))
    if page.get("next_offset") is not None:
        print(f"(more: --offset {page['next_offset']})")


def cmd_cancel(_settings: Settings, args: argparse.Namespace) -> None:
    with client_from_args(args) as client:
        job = run_or_fail(
            call_api, client, "POST", "/post_training/job/cancel", json={"job_uuid": args.job_uuid}
        )
    print(f"{job['job_uuid']}: {job['status']}")


def _follow_and_report(client: httpx.Client, job_uuid: str, args: argparse.Namespace) -> None:
    job = run_or_fail(follow, client, job_uuid, out=sys.stdout, poll_s=args.poll)
    if job["status"] != "completed":
        fail(f"{job_uuid} ended {job['status']}")


def add_jobs_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = commands.add_parser("jobs", help="fine-tuning jobs on a running server").add_subparsers(
        dest="jobs_command", required=True, metavar="ACTION"
    )
    submit = jobs.add_parser("submit", help="submit a fine-tuning (or DPO) request file")
    submit.add_argument("request", help="JSON file: the spec's request body")
    submit.add_argument("--follow", action="store_true", help="show progress until it ends")
    submit.set_defaults(handler=cmd_submit)

    status = jobs.add_parser("status", help="a job's status (--follow: a live progress bar)")
    status.add_argument("job_uuid")
    status.add_argument("--follow", action="store_true", help="redraw until the job ends")
    status.set_defaults(handler=cmd_status)

    logs = jobs.add_parser("logs", help="a job's log lines")
    logs.add_argument("job_uuid")
    logs.add_argument("--follow", action="store_true", help="print new lines until it ends")
    logs.set_defaults(handler=cmd_logs)

    artifacts = jobs.add_parser("artifacts", help="a job's checkpoints")
    artifacts.add_argument("job_uuid")
    artifacts.set_defaults(handler=cmd_artifacts)

    listing = jobs.add_parser("list", help="jobs, newest first")
    listing.add_argument(
        "--status",
        action="append",
        choices=["scheduled", "running", "completed", "failed", "cancelled"],
        help="only jobs in this status (repeatable)",
    )
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--offset", type=int, default=0)
    listing.set_defaults(handler=cmd_list)

    cancel = jobs.add_parser("cancel", help="cancel a job (stops its Ray job)")
    cancel.add_argument("job_uuid")
    cancel.set_defaults(handler=cmd_cancel)

    for parser in (submit, status, logs, artifacts, listing, cancel):
        add_connection_options(parser)
        parser.add_argument("--poll", type=float, default=1.0, help=argparse.SUPPRESS)
