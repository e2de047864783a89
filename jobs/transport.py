"""How a job's reports reach the store: one small protocol, two ways.

- `HttpTransport`: the API's internal routes with the job's own token, what every job
  Ray runs uses (docs/job_credentials.md). A call that meets no answer (a connection
  error, a 5xx, 408 or 429: the API restarting) is retried with backoff for the
  target's `retry_s`, so a job outlives an API restart; a refusal (any other 4xx) is
  final and raised at once.
- `DatabaseTransport`: the store itself through `corral.services.job_reports`, the same
  rules the internal routes apply, for a recipe run in-process (tests, benchmarks).

Both raise `ReportRefused` for what the server refuses, with its status and message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from corral.api.internal_jobs import (
    CheckpointBody,
    CheckpointList,
    DatasetBody,
    LaunchAnswer,
    LogBody,
    MetricsBody,
    PlanBody,
    StatusAnswer,
    TransitionAnswer,
    TransitionBody,
)
from corral.errors import CorralError, NotFound, http_status_for
from corral.services.job_reports import CheckpointRecord, JobLaunch, JobReports, JobState
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, TransitionOutcome
from jobs.report_target import ReportTarget

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 30.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
_RETRIED_STATUSES = frozenset({408, 429})


class ReportRefused(Exception):
    """The server refused a report (4xx): the call is not retried."""

    def __init__(self, status_code: int, message: str) -> None:
        # Both in `args`: Ray pickles a worker's exception, and unpickling calls
        # `cls(*args)`.
        super().__init__(status_code, message)
        self.status_code = status_code
        self.message = message

    def __str__(self) -> str:
        return self.message


class ReportUnavailable(Exception):
    """No answer from the API within the target's retry time."""


class JobTransport(Protocol):
    """One job's reads and writes of its own row (see corral.services.job_reports)."""

    job_key: str

    def launch(self) -> JobLaunch: ...
    def state(self) -> JobState | None:
        """None when the store has no such job."""
        ...

    def transition(
        self,
        to: JobStatus,
        *,
        error: str | None = None,
        resources_allocated: dict[str, Any] | None = None,
    ) -> TransitionOutcome: ...
    def log(self, lines: Sequence[str]) -> None: ...
    def plan(self, *, total_steps: int, detail: str) -> None: ...
    def metrics(self, *, step: int, epoch: int | None, values: dict[str, float]) -> None: ...
    def checkpoint(self, *, iters: int, path: str, metrics: dict[str, float] | None) -> None: ...
    def checkpoints(self) -> list[CheckpointRecord]: ...
    def complete_with_dataset(
        self, *, row_count: int, content_sha256: str
    ) -> TransitionOutcome: ...

    def close(self) -> None: ...


def open_transport(target: ReportTarget, job_key: str) -> JobTransport:
    """The transport `target` names, for the job `job_key`; close it when done."""
    if target.database_url is not None:
        return DatabaseTransport(Database(target.database_url), job_key, owns_database=True)
    assert target.internal_url is not None and target.token is not None  # the target says so
    return HttpTransport(
        target.internal_url, job_key, token=target.token.get_secret_value(), retry_s=target.retry_s
    )


# ------------------------------------------------------------------ database


class DatabaseTransport:
    """Reports straight to the store, by the rules the internal routes apply."""

    def __init__(self, database: Database, job_key: str, *, owns_database: bool = False) -> None:
        """With `owns_database`, `close` disposes of the database too."""
        self.job_key = job_key
        self._database = database
        self._reports = JobReports(database=database)
        self._owns = owns_database

    def _do(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except CorralError as exc:
            raise ReportRefused(http_status_for(exc), exc.message) from exc

    def launch(self) -> JobLaunch:
        launch: JobLaunch = self._do(lambda: self._reports.launch(self.job_key))
        return launch

    def state(self) -> JobState | None:
        try:
            return self._reports.state(self.job_key)
        except NotFound:
            return None

    def transition(
        self,
        to: JobStatus,
        *,
        error: str | None = None,
        resources_allocated: dict[str, Any] | None = None,
    ) -> TransitionOutcome:
        outcome: TransitionOutcome = self._do(
            lambda: self._reports.transition(
                self.job_key, to=to, error=error, resources_allocated=resources_allocated
            )
        )
        return outcome

    def log(self, lines: Sequence[str]) -> None:
        self._do(lambda: self._reports.log(self.job_key, *lines))

    def plan(self, *, total_steps: int, detail: str) -> None:
        self._do(lambda: self._reports.plan(self.job_key, total_steps=total_steps, detail=detail))

    def metrics(self, *, step: int, epoch: int | None, values: dict[str, float]) -> None:
        self._do(lambda: self._reports.metrics(self.job_key, step=step, epoch=epoch, values=values))

    def checkpoint(self, *, iters: int, path: str, metrics: dict[str, float] | None) -> None:
        self._do(
            lambda: self._reports.checkpoint(self.job_key, iters=iters, path=path, metrics=metrics)
        )

    def checkpoints(self) -> list[CheckpointRecord]:
        found: list[CheckpointRecord] = self._do(lambda: self._reports.checkpoints(self.job_key))
        return found

    def complete_with_dataset(self, *, row_count: int, content_sha256: str) -> TransitionOutcome:
        outcome: TransitionOutcome = self._do(
            lambda: self._reports.complete_with_dataset(
                self.job_key, row_count=row_count, content_sha256=content_sha256
            )
        )
        return outcome

    def close(self) -> None:
        if self._owns:
            self._database.dispose()


# ------------------------------------------------------------------ HTTP


class HttpTransport:
    """Reports to `/internal/jobs/{job_key}/...` under `base_url` with the job's token."""

    def __init__(
        self,
        base_url: str,
        job_key: str,
        *,
        token: str,
        retry_s: float,
        client: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`client` and `sleep` are for tests; by default a client of its own that reads
        no proxy settings from the environment (the internal URL is the operator's)."""
        self.job_key = job_key
        self._base = f"{base_url.rstrip('/')}/internal/jobs/{quote(job_key, safe='')}"
        self._headers = {"Authorization": f"Bearer {token}"}
        self._retry_s = retry_s
        self._client = client or httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False)
        self._sleep = sleep

    def _call(self, method: str, route: str, body: BaseModel | None = None) -> _Answer:
        """The answer to one call, retried while the API does not answer."""
        deadline = time.monotonic() + self._retry_s
        content = body.model_dump_json().encode() if body is not None else None
        headers = self._headers | ({"Content-Type": "application/json"} if content else {})
        delay, tries = FIRST_BACKOFF_S, 0
        while True:
            tries += 1
            try:
                response = self._client.request(
                    method, f"{self._base}/{route}", content=content, headers=headers
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return _Answer(response, retried=tries > 1)
                if response.status_code < 500 and response.status_code not in _RETRIED_STATUSES:
                    raise ReportRefused(response.status_code, _message(response))
                problem = f"HTTP {response.status_code}: {_message(response)}"
            if time.monotonic() + delay > deadline:
                raise ReportUnavailable(
                    f"{method} {route} for job {self.job_key}: no answer from the API in "
                    f"{self._retry_s:g} s ({tries} tries; last: {problem})"
                )
            if tries == 1 or tries % 10 == 0:
                log.warning("job %s: %s %s: %s; retrying", self.job_key, method, route, problem)
            self._sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    def launch(self) -> JobLaunch:
        answer = LaunchAnswer.model_validate_json(self._call("GET", "launch").response.content)
        return JobLaunch(
            kind=JobKind(answer.kind),
            attempt=answer.attempt,
            launch=answer.launch,
            tensorboard_dir=answer.tensorboard_dir,
        )

    def state(self) -> JobState | None:
        try:
            answer = self._call("GET", "status")
        except ReportRefused as exc:
            if exc.status_code == 404:
                return None
            raise
        parsed = StatusAnswer.model_validate_json(answer.response.content)
        return JobState(status=JobStatus(parsed.status), attempt=parsed.attempt)

    def _outcome(self, to: JobStatus, answer: _Answer) -> TransitionOutcome:
        parsed = TransitionAnswer.model_validate_json(answer.response.content)
        status = JobStatus(parsed.status)
        if not parsed.applied and answer.retried and status is to:
            # An earlier try was applied and only its answer was lost: the row shows it.
            return TransitionOutcome(applied=True, status=status)
        return TransitionOutcome(applied=parsed.applied, status=status, refused=parsed.refused)

    def transition(
        self,
        to: JobStatus,
        *,
        error: str | None = None,
        resources_allocated: dict[str, Any] | None = None,
    ) -> TransitionOutcome:
        body = TransitionBody.model_validate(
            {"to": to.value, "error": error, "resources_allocated": resources_allocated}
        )
        return self._outcome(to, self._call("POST", "transition", body))

    def log(self, lines: Sequence[str]) -> None:
        self._call("POST", "logs", LogBody(lines=list(lines)))

    def plan(self, *, total_steps: int, detail: str) -> None:
        self._call("POST", "plan", PlanBody(total_steps=total_steps, detail=detail))

    def metrics(self, *, step: int, epoch: int | None, values: dict[str, float]) -> None:
        self._call("POST", "metrics", MetricsBody(step=step, epoch=epoch, values=values))

    def checkpoint(self, *, iters: int, path: str, metrics: dict[str, float] | None) -> None:
        self._call("POST", "checkpoints", CheckpointBody(iters=iters, path=path, metrics=metrics))

    def checkpoints(self) -> list[CheckpointRecord]:
        answer = CheckpointList.model_validate_json(
            self._call("GET", "checkpoints").response.content
        )
        return [CheckpointRecord(c.iters, c.path) for c in answer.checkpoints]

    def complete_with_dataset(self, *, row_count: int, content_sha256: str) -> TransitionOutcome:
        body = DatasetBody(row_count=row_count, content_sha256=content_sha256)
        return self._outcome(JobStatus.COMPLETED, self._call("POST", "dataset", body))

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True)
class _Answer:
    response: httpx.Response
    retried: bool  # whether an earlier try of the same call went unanswered


def _message(response: httpx.Response) -> str:
    """The error message of a Corral error body, else the start of the body."""
    try:
        body = response.json()
        message = body["error"]["message"]
        if isinstance(message, str):
            return message
    except (ValueError, KeyError, TypeError):
        pass
    return response.text[:500] or response.reason_phrase
