"""One attempt of a training job, the same for every recipe: mark the job running, fit on
Ray Train, record completed or failed; and where an attempt resumes from.

The run's name carries the attempt: Train V2 resumes a run whose `RunConfig(name,
storage_path)` already exists, so a new attempt must not reuse the last one's name. Workers
resume from the job's last checkpoint row rather than `ray.train.get_checkpoint()`: Ray
Train registers a report only when its controller next polls the workers, so a worker
killed just after reporting leaves a row Ray Train never saw, and resuming from Ray Train's
older checkpoint would save the same `iters` twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from corral.storage import Storage
from jobs import phases
from jobs.report_target import ReportTarget
from jobs.reporting import JobReporter
from jobs.resources import worker_resources
from serve_apps.model_cache import StorageOptions

log = logging.getLogger(__name__)


class AttemptSettings(Protocol):
    """The fields of a job config that running an attempt needs."""

    @property
    def job_key(self) -> str: ...
    @property
    def report_to(self) -> ReportTarget | None: ...
    @property
    def output_dir(self) -> Path: ...
    @property
    def num_workers(self) -> int: ...
    @property
    def use_gpu(self) -> bool: ...
    @property
    def max_failures(self) -> int: ...
    @property
    def output_uri(self) -> str | None: ...
    @property
    def storage(self) -> StorageOptions: ...


def run_attempt(
    config: AttemptSettings,
    train_loop: Callable[[dict[str, Any]], None],
    *,
    describe: Callable[[int, str | None], list[str]],
) -> None:
    """Run one attempt of the job and record its outcome in the store. `describe(attempt,
    resume_from)` gives the log lines that open the attempt."""
    reporter = JobReporter.open(config.report_to, config.job_key)
    try:
        attempt, resume_from = attempt_and_last_checkpoint(reporter)
        resources = {"num_workers": config.num_workers, "use_gpu": config.use_gpu}
        started = reporter.started(resources_allocated=resources)
        if not started.applied:
            log.warning("job %s is %s; not training", config.job_key, started.status)
            return
        reporter.log(*describe(attempt, resume_from))
        times = phases.StartTimes(submitted_at=phases.submitted_at(), fit_started_at=time.time())
        ready = phases.driver_line(
            submitted=times.submitted_at,
            process_started=phases.process_started_at(),
            now=times.fit_started_at,
        )
        if ready is not None:
            reporter.log(ready)
        try:
            fit(config, train_loop, attempt=attempt, times=times)
        except Exception as exc:
            reporter.failed(str(exc) or type(exc).__name__)
            raise
        completed = reporter.completed()
        if not completed.applied:
            reporter.log(f"training finished but the job is {completed.status}; left as it is")
    finally:
        reporter.close()


def fit(
    config: AttemptSettings,
    train_loop: Callable[[dict[str, Any]], None],
    *,
    attempt: int,
    times: phases.StartTimes | None = None,
) -> None:
    """Fit on Ray Train; every worker runs `train_loop({"config": config, ...})`, with the
    driver's start-up timestamps (`times`, for the phase lines) beside it. Ray Train's
    run state goes under the job's directory: in object storage when it has a URI (with a
    filesystem that carries the endpoint), else beside the checkpoints."""
    storage_path, storage_filesystem = str(config.output_dir / "ray"), None
    if config.output_uri is not None:
        storage = Storage(config.output_uri, options=config.storage)
        storage_path, storage_filesystem = storage.ray_train_storage(f"{config.output_uri}/ray")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config} | (times.as_loop_config() if times else {}),
        # What admission counted this job's need as (jobs/resources.py).
        scaling_config=ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker=worker_resources(config.use_gpu),
        ),
        run_config=RunConfig(
            name=f"{config.job_key}-attempt-{attempt}",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    trainer.fit()


def attempt_and_last_checkpoint(reporter: JobReporter) -> tuple[int, str | None]:
    """The job's attempt number and the path of its last checkpoint row, if any."""
    state = reporter.state()
    if state is None:
        raise LookupError(f"no job {reporter.job_key!r} in the store")
    return state.attempt, reporter.last_checkpoint_path()


def last_checkpoint_path(config: AttemptSettings) -> str | None:
    """Where a worker resumes from (see the module docstring)."""
    reporter = JobReporter.open(config.report_to, config.job_key)
    try:
        return reporter.last_checkpoint_path()
    finally:
        reporter.close()
