"""The one entrypoint of every Corral Ray job: `python -m jobs.launch`.

It takes no arguments. The job's key (`Job.key`, derived by the server from the tenant and
the job's uuid), its own token and the URL of the API's internal routes come from the
environment the API server set (never from a request; never the store's URL: see
docs/job_credentials.md); the job's kind and launch config come from its row, read
through those routes. It runs the recipe for the kind (the `RECIPES` table: a new job
kind adds its row there) and exits 0 only when the row says completed, so Ray's own job
status agrees with the store's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from corral.ray_jobs import INTERNAL_URL_ENV, JOB_KEY_ENV, JOB_TOKEN_ENV
from corral.store.jobs import JobKind, JobStatus
from jobs.config import DPOJobConfig, SFTJobConfig
from jobs.phases import IMPORTS_KEY
from jobs.report_target import ReportTarget
from jobs.reporting import JobReporter
from jobs.sdg.config import SyntheticDataJobConfig

log = logging.getLogger("jobs.launch")

# A recipe takes the job's launch config (with its key and where it reports) and runs it.
Recipe = Callable[[dict[str, Any]], None]


# The driver of a training job only starts the trainer: it never imports the recipe modules
# (transformers, peft, bitsandbytes, DeepSpeed: seconds of CPU before Ray Train even starts
# the workers, and on a small machine taken from them). Each Ray Train worker imports its
# recipe when it first runs the train loop below; `jobs.attempts` brings Ray Train (and torch).
def _supervised_fine_tune(settings: dict[str, Any]) -> None:
    from jobs.attempts import run_attempt

    config = SFTJobConfig.model_validate(settings)
    run_attempt(config, sft_train_loop, describe=config.attempt_lines)


def _preference_optimize(settings: dict[str, Any]) -> None:
    from jobs.attempts import run_attempt

    config = DPOJobConfig.model_validate(settings)
    run_attempt(config, dpo_train_loop, describe=config.attempt_lines)


def sft_train_loop(loop_config: dict[str, Any]) -> None:
    """Each Ray Train worker of an SFT job: `jobs.sft.train_loop`, imported here."""
    started = time.time(), time.process_time()
    if loop_config["config"].algorithm != "qlora":
        _without_bitsandbytes()
    from jobs import sft

    sft.train_loop(loop_config | {IMPORTS_KEY: since(started)})


def dpo_train_loop(loop_config: dict[str, Any]) -> None:
    """Each Ray Train worker of a DPO job: `jobs.dpo.train_loop`, imported here."""
    started = time.time(), time.process_time()
    _without_bitsandbytes()
    from jobs import dpo

    dpo.train_loop(loop_config | {IMPORTS_KEY: since(started)})


def since(started: tuple[float, float]) -> tuple[float, float]:
    """Wall and CPU seconds since `started` (`time.time()`, `time.process_time()`)."""
    return time.time() - started[0], time.process_time() - started[1]


def _without_bitsandbytes() -> None:
    """In a worker that does not quantize: peft imports bitsandbytes whenever it is
    installed, and that import pulls in torch's compiler stack (1.2 s of CPU per worker
    here); only QLoRA uses it. A None entry in sys.modules is Python's documented way to make
    an import fail, and peft then takes bitsandbytes as absent. A worker process serves one
    job (Ray does not share worker processes between jobs), and one that has already
    imported it keeps it."""
    sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]


# Ray Data and the Serve handles, by the same rule.
def _synthetic_data_generation(settings: dict[str, Any]) -> None:
    from jobs.sdg import job

    job.main(SyntheticDataJobConfig.model_validate(settings))


RECIPES: dict[JobKind, Recipe] = {
    JobKind.SUPERVISED_FINE_TUNE: _supervised_fine_tune,
    JobKind.PREFERENCE_OPTIMIZE: _preference_optimize,
    JobKind.SYNTHETIC_DATA_GENERATION: _synthetic_data_generation,
}


def run(job_key: str, target: ReportTarget) -> JobStatus | None:
    """Run the job's recipe, reporting to `target`; returns the status stored afterwards."""
    reporter = JobReporter.open(target, job_key)
    try:
        found = reporter.transport.launch()
        kind, launch = found.kind, dict(found.launch)
        # Launch configs stored before job keys named the job by its uuid (then its key).
        launch.pop("job_uuid", None)
        settings = {**launch, "job_key": job_key, "report_to": target}
        try:
            recipe = RECIPES.get(kind)
            if recipe is None:
                raise ValueError(f"jobs of kind {kind.value!r} have no recipe here")
            recipe(settings)
        except Exception as exc:
            # The recipes record their own failures; this records what fails before them.
            log.exception("job %s failed", job_key)
            status = reporter.status()
            if status is None or not status.is_terminal:
                reporter.failed(f"{type(exc).__name__}: {exc}")
        return reporter.status()
    finally:
        reporter.close()


def target_from_environment() -> ReportTarget:
    """Where the launcher told this job to report (corral.ray_jobs.job_runtime_env)."""
    return ReportTarget(internal_url=os.environ[INTERNAL_URL_ENV], token=os.environ[JOB_TOKEN_ENV])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    job_key = os.environ[JOB_KEY_ENV]
    status = run(job_key, target_from_environment())
    log.info("job %s ends %s", job_key, status)
    return 0 if status is JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
