"""A job's progress while it runs, for people: a rich progress bar redrawn in place on a
terminal, otherwise one plain line each time it changes (logs and tests read those).
Shared by `corral jobs submit/status --follow` and the demo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from corral.api.jobs import JobSummary
from corral.client import CorralClient

BAR_WIDTH = 30
STATUS_STYLES = {
    "scheduled": "dim",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "yellow",
}


def progress_line(job: JobSummary) -> str:
    """One line: a bar of steps done out of planned (when known), the loss, the status."""
    step = job.progress.step if job.progress else 0
    total = job.progress.total_steps if job.progress else None
    if total:
        filled = min(BAR_WIDTH, round(BAR_WIDTH * step / total))
        bar = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {step}/{total} steps"
    else:
        bar = f"[{'?' * BAR_WIDTH}] {step} steps"
    return f"{job.job_uuid} {bar}{_loss(job)}  {job.status}{_queued(job)}"


def follow(
    client: CorralClient,
    job_uuid: str,
    *,
    out: TextIO,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> JobSummary:
    """Show the job's progress until it ends; returns its last summary. Raises the
    client's WaitTimeout past `timeout_s`."""
    summaries = client.follow_job(job_uuid, poll_s=poll_s, timeout_s=timeout_s)
    job = _draw_bar(summaries, job_uuid, out) if out.isatty() else _print_lines(summaries, out)
    if job.error:
        out.write(f"{job_uuid}: {job.error}\n")
    return job


def _print_lines(summaries: Iterator[JobSummary], out: TextIO) -> JobSummary:
    last = ""
    for job in summaries:
        line = progress_line(job)
        if line != last:
            out.write(line + "\n")
            out.flush()
        last = line
    return job


def _draw_bar(summaries: Iterator[JobSummary], job_uuid: str, out: TextIO) -> JobSummary:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(bar_width=BAR_WIDTH),
        MofNCompleteColumn(),
        TextColumn("steps{task.fields[loss]}  {task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(file=out)) as bar:
        task = bar.add_task(job_uuid, total=None, loss="", status="")
        for job in summaries:
            style = STATUS_STYLES.get(job.status, "")
            bar.update(
                task,
                completed=job.progress.step if job.progress else 0,
                # None (unchanged: an indeterminate bar) until the recipe plans its steps.
                total=job.progress.total_steps if job.progress else None,
                loss=_loss(job),
                status=(f"[{style}]{job.status}[/]" if style else job.status)
                + escape(_queued(job)),
            )
    return job


def _queued(job: JobSummary) -> str:
    """A queued job's place and reason (docs/admission.md): `(queued #2: waiting ...)`."""
    if job.queue_reason is None:
        return ""
    place = f" #{job.queue_position}" if job.queue_position is not None else ""
    return f" (queued{place}: {job.queue_reason})"


def _loss(job: JobSummary) -> str:
    loss = job.progress.loss if job.progress else None
    return f"  loss {loss:.4f}" if loss is not None else ""
