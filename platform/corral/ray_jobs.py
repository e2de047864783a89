"""Fine-tuning runs as Ray jobs: submitted, watched and stopped through the Ray Jobs API.

The entrypoint is one fixed command (`python -m jobs.launch`) that reads its job through
the API's internal routes; the job's key, its own token and the internal URL travel as
environment variables (`job_runtime_env`), never the store's URL: anyone who can read
the Ray dashboard can read a runtime_env, and a job token opens only its own job's
reporting routes (docs/job_credentials.md). Nothing a client sends ever becomes part of
a command line, a runtime_env or a working dir. The Ray
submission id is the job's key (`corral.tenancy.job_key`: derived from the tenant and
the job's uuid, so two tenants' jobs never share one), or `KEY~N` for attempt N of a job
the reconciler relaunched (`submission_id`); a second submission of the same attempt
cannot start a second run: Ray refuses the id.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from corral.errors import BackendUnavailable
from corral.job_tokens import JobTokens

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

log = logging.getLogger(__name__)

ENTRYPOINT = f"{sys.executable} -m jobs.launch"
JOB_KEY_ENV = "CORRAL_JOB_KEY"
JOB_TOKEN_ENV = "CORRAL_JOB_TOKEN"  # noqa: S105 - a variable name, not a secret
INTERNAL_URL_ENV = "CORRAL_INTERNAL_URL"
# When the launcher submitted the run (`time.time()`): the job logs its start-up phases
# against it (jobs/phases.py).
SUBMITTED_AT_ENV = "CORRAL_SUBMITTED_AT"
DASHBOARD_PORT = 8265
# Worker and driver logs otherwise carry Ray Train's bytecode dumps of the print patch.
_JOB_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}


class RayJobState(enum.StrEnum):
    """Ray's own job states (ray.job_submission.JobStatus), as Corral reads them."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"

    @property
    def is_terminal(self) -> bool:
        return self in {RayJobState.STOPPED, RayJobState.SUCCEEDED, RayJobState.FAILED}


@dataclass(frozen=True)
class RayJobInfo:
    state: RayJobState
    message: str | None = None


class RayJobsUnavailable(BackendUnavailable):
    """The Ray Jobs API could not be reached or refused the call."""


def submission_id(job_key: str, attempt: int = 0) -> str:
    """The Ray submission id of one attempt of a job: the job's key for its first
    attempt, `KEY~N` for attempt N (a job the reconciler relaunched after its process
    died). `~` is outside the alphabet of job keys, so no other job's key equals it."""
    return job_key if attempt == 0 else f"{job_key}~{attempt}"


class JobLauncher(Protocol):
    """What the job services and the reconciler need from Ray. A job's runs are named by
    `submission_id(key, attempt)`."""

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        """Start attempt `attempt` of the job with this key (`Job.key`) under
        `submission_id(job_key, attempt)`; False when Ray already has a job with that id."""
        ...

    def info(self, submission_id: str) -> RayJobInfo | None:
        """Ray's view of the run, or None when Ray has never heard of it."""
        ...

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the run; False when it was not running (or is unknown)."""
        ...


def jobs_api_url(*, address: str | None, dashboard_url: str | None) -> str:
    """Where the Jobs API answers: the given dashboard URL, else port 8265 on the host of
    a Ray address (`host:port`, `ray://host:port`); `auto` means this machine."""
    if dashboard_url:
        return dashboard_url.rstrip("/")
    if address is None or address in {"auto", "local"}:
        return f"http://127.0.0.1:{DASHBOARD_PORT}"
    host = urlsplit(address if "://" in address else f"ray://{address}").hostname
    if not host:
        raise ValueError(f"cannot tell the Ray head's host from RAY_ADDRESS={address!r}")
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{DASHBOARD_PORT}"


def job_runtime_env(
    job_key: str,
    *,
    token: str,
    internal_url: str,
    extra_env: Mapping[str, str] | None = None,
    submitted_at: float | None = None,
) -> dict[str, object]:
    """The runtime_env of a job's Ray submission: its key, its own token and where the
    API's internal routes answer, besides the server-side `extra_env`; nothing else about
    the server (no store URL, no key) goes in, since the Ray dashboard shows it."""
    env = {**_JOB_ENV, **(extra_env or {})}
    env |= {JOB_KEY_ENV: job_key, JOB_TOKEN_ENV: token, INTERNAL_URL_ENV: internal_url}
    env[SUBMITTED_AT_ENV] = f"{time.time() if submitted_at is None else submitted_at:.3f}"
    return {"env_vars": env}


class RayJobLauncher:
    """`JobLauncher` over Ray's `JobSubmissionClient`."""

    def __init__(
        self,
        jobs_url: str,
        *,
        internal_url: str,
        tokens: JobTokens,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        """Jobs report to the internal routes at `internal_url` with the token `tokens`
        makes for them (the API checks it under the same secret); `extra_env` is
        server-side configuration every job needs (the embedded head's jobs inherit
        Ray's auth variables from it)."""
        self.jobs_url = jobs_url
        self._internal_url = internal_url.rstrip("/")
        self._tokens = tokens
        self._extra_env = dict(extra_env or {})
        self._client_instance: JobSubmissionClient | None = None

    def _client(self) -> JobSubmissionClient:
        from ray.job_submission import JobSubmissionClient

        if self._client_instance is None:
            try:
                self._client_instance = JobSubmissionClient(self.jobs_url)
            except _TRANSPORT_ERRORS as exc:
                raise self._unavailable(exc) from exc
        return self._client_instance

    def _unavailable(self, exc: BaseException) -> RayJobsUnavailable:
        return RayJobsUnavailable(f"the Ray Jobs API at {self.jobs_url}: {exc}")

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        run_id = submission_id(job_key, attempt)
        if self.info(run_id) is not None:
            return False
        runtime_env = job_runtime_env(
            job_key,
            token=self._tokens.token_for(job_key),
            internal_url=self._internal_url,
            extra_env=self._extra_env,
        )
        try:
            self._client().submit_job(
                entrypoint=ENTRYPOINT,
                submission_id=run_id,
                runtime_env=runtime_env,
                metadata={"corral_job_key": job_key, "corral_attempt": str(attempt)},
            )
        except _TRANSPORT_ERRORS as exc:
            if self.info(run_id) is not None:  # a concurrent submission won
                return False
            raise self._unavailable(exc) from exc
        log.info("submitted Ray job %s", run_id)
        return True

    def info(self, submission_id: str) -> RayJobInfo | None:
        try:
            details = self._client().get_job_info(submission_id)
        except _TRANSPORT_ERRORS as exc:
            if _is_unknown_job(exc):
                return None
            raise self._unavailable(exc) from exc
        return RayJobInfo(state=RayJobState(str(details.status)), message=details.message)

    def stop(self, submission_id: str) -> bool:
        try:
            return bool(self._client().stop_job(submission_id))
        except _TRANSPORT_ERRORS as exc:
            if _is_unknown_job(exc):
                return False
            raise self._unavailable(exc) from exc


# The Jobs SDK raises RuntimeError for error answers and requests' errors (OSError) when the
# dashboard cannot be reached.
_TRANSPORT_ERRORS = (RuntimeError, OSError)


def _is_unknown_job(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "does not exist" in str(exc)
