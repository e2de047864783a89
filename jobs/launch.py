"""The one entrypoint of every Corral Ray job: `python -m jobs.launch`.

It takes no arguments. The job's key (`Job.key`, derived by the server from the tenant and
the job's uuid) and the SQL store's URL come from the environment the API server set
(never from a request); the job's kind and launch config come from its row. It runs the
recipe for the kind (the `RECIPES` table: a new job kind adds its row there) and exits 0
only when the row says completed, so Ray's own job status agrees with the store's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from corral.ray_jobs import DATABASE_URL_ENV, JOB_KEY_ENV
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus
from corral.store.tables import Job
from jobs.config import DPOJobConfig, SFTJobConfig
from jobs.phases import IMPORTS_KEY
from jobs.reporting import JobReporter
from jobs.sdg.config import SyntheticDataJobConfig

log = logging.getLogger("jobs.launch")

# A recipe takes the job's launch config (with its key and the store's URL) and runs it.
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


def run(job_key: str, database_url: str) -> JobStatus | None:
    """Run the job's recipe; returns the status stored afterwards."""
    database = Database(database_url)
    reporter = JobReporter(database, job_key)
    try:
        with database.transaction() as session:
            job = session.get(Job, job_key)
            if job is None:
                raise LookupError(f"no job {job_key!r} in the store")
            kind, launch = JobKind(job.kind), dict(job.launch or {})
        # Launch configs stored before job keys named the job by its uuid (then its key).
        launch.pop("job_uuid", None)
        settings = {**launch, "job_key": job_key, "database_url": database_url}
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
        database.dispose()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    status = run(os.environ[JOB_KEY_ENV], os.environ[DATABASE_URL_ENV])
    log.info("job %s ends %s", os.environ[JOB_KEY_ENV], status)
    return 0 if status is JobStatus.COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
