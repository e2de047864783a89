"""The SFT recipe survives losing a training worker: Ray Train restarts the worker group,
which resumes from the job's last checkpoint, and the job completes."""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.config import SFTJobConfig
from jobs.sft import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOB = "sft-killed-worker"
WORKERS = 2
STEPS_PER_EPOCH = 16
ANSWER = "Corral fine-tunes Llama models on Ray."
STEP = re.compile(r"step (\d+) loss ")


def _rows(count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "dialog": [
                {"role": "system", "content": f"{prefix} assistant number {index}."},
                {"role": "user", "content": "What is Corral?"},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for index in range(count)
    ]


def _train_workers() -> list[psutil.Process]:
    """This session's Ray Train worker processes. The test's own Ray cluster runs as its
    children (head processes, then the workers the raylet starts), so no other cluster on
    the machine is looked at."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[:1] and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _holds_open(process: psutil.Process, path: str) -> bool:
    try:
        return any(f.path == path for f in process.open_files())
    except psutil.NoSuchProcess:
        return False


class WorkerKiller:
    """Watches the store from outside the job; once the first epoch's checkpoint row is
    there and rank 0 has logged `kill_after_step`, SIGKILLs the rank 0 worker process (the
    one that holds the job's database open: it writes the job's rows)."""

    def __init__(self, db: Database, database_file: str, *, kill_after_step: int) -> None:
        self.db, self.database_file, self.kill_after_step = db, database_file, kill_after_step
        self.killed: int | None = None
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> WorkerKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        try:
            while not self._stop.wait(0.05):
                if self._ready():
                    self._kill_rank_zero()
                    return
        except BaseException as exc:  # reported by the test, not lost in this thread
            self.error = exc

    def _ready(self) -> bool:
        with self.db.transaction() as session:
            store = JobStore(session)
            if not store.checkpoints(job_key("t", JOB)):
                return False
            wanted = f"step {self.kill_after_step} "
            return any(line.line.startswith(wanted) for line in store.log_lines(job_key("t", JOB)))

    def _kill_rank_zero(self) -> None:
        [rank_zero] = [w for w in _train_workers() if _holds_open(w, self.database_file)]
        os.kill(rank_zero.pid, signal.SIGKILL)
        self.killed = rank_zero.pid


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """Epoch 1 of 2 ends with a checkpoint at step 16; rank 0 is killed once it has logged
    step 17. Ray Train restarts both workers, which resume from that checkpoint, so steps
    1-16 run once, the step or two of epoch 2 done before the kill run again, and the job
    completes.

    The kill usually lands before Ray Train's controller (which polls the workers every 2 s)
    has collected the checkpoint report, so Ray Train itself never registers that
    checkpoint: the store's row is what the new worker group resumes from."""
    with sqlite_database.transaction() as session:
        JobStore(session).create(
            job_uuid=JOB,
            tenant="t",
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={},
            launch={"output_dir": str(tmp_path / "out")},
        )
    config = SFTJobConfig(
        job_key=job_key("t", JOB),
        report_to={"database_url": sqlite_database.url},
        model_dir=demo_model_dir,
        output_dir=tmp_path / "out",
        rows=_rows(WORKERS * STEPS_PER_EPOCH, "You are"),
        validation_rows=_rows(2, "You are a new"),
        algorithm="lora",
        adapter=LoraFinetuningConfig(
            lora_attn_modules=["q_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=True,
            rank=8,
            alpha=64,
        ),
        optimizer=OptimizerConfig(optimizer_type="adamw", lr=3e-3, lr_min=3e-4, weight_decay=0),
        n_epochs=2,
        n_iters=100,
        batch_size=1,
        num_workers=WORKERS,
        max_failures=1,
    )
    database_file = str(tmp_path / "corral.db")  # the sqlite_database fixture's file
    with WorkerKiller(
        sqlite_database, database_file, kill_after_step=STEPS_PER_EPOCH + 1
    ) as killer:
        main(config)
    assert killer.error is None, killer.error
    assert killer.killed is not None, "the run ended before a worker could be killed"

    with sqlite_database.transaction() as session:
        store = JobStore(session)
        status = store.status_of(job_key("t", JOB))
        lines = [line.line for line in store.log_lines(job_key("t", JOB))]
        checkpoints = [(c.iters, c.metrics) for c in store.checkpoints(job_key("t", JOB))]
    assert status == JobStatus.COMPLETED, lines

    last_step = 2 * STEPS_PER_EPOCH
    step_lines = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := STEP.match(line))]
    steps = [step for _, step in step_lines]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    # Everything up to the checkpoint ran once; then epoch 2 started, was cut short by the
    # kill, and ran again in full from the checkpoint.
    assert steps[:STEPS_PER_EPOCH] == list(range(1, STEPS_PER_EPOCH + 1)), steps
    assert steps[restart:] == list(range(STEPS_PER_EPOCH + 1, last_step + 1)), steps
    assert STEPS_PER_EPOCH + 1 <= steps[restart - 1] < last_step, steps
    # Rank 0 of the new worker group says where it resumed, between the two runs of epoch 2.
    [resumed] = [i for i, line in enumerate(lines) if line.startswith("resumed ")]
    assert step_lines[restart - 1][0] < resumed < step_lines[restart][0], lines
    assert f"at step {STEPS_PER_EPOCH} " in lines[resumed], lines[resumed]
    assert f"iter-{STEPS_PER_EPOCH}" in lines[resumed], lines[resumed]
    # Each worker group's start-up is logged (jobs/phases.py): the restarted one's too.
    ready = [i for i, line in enumerate(lines) if line.startswith("phase: worker group ready ")]
    assert len(ready) == 2 and step_lines[restart - 1][0] < ready[1] < resumed, lines
    # Weights, optimizer, schedule and data order all came back: the first step of epoch 2
    # logs the same loss and lr before the kill and after the restart.
    first_of_epoch_2 = [
        lines[i].split(" tokens/s")[0] for i, step in step_lines if step == STEPS_PER_EPOCH + 1
    ]
    assert len(first_of_epoch_2) == 2 and len(set(first_of_epoch_2)) == 1, first_of_epoch_2

    assert [iters for iters, _ in checkpoints] == [STEPS_PER_EPOCH, last_step]
    assert lines[-1] == f"done after {last_step} steps", lines
    validation = [
        float(m.group(1)) for line in lines if (m := re.search(r"validation loss (\S+)", line))
    ]
    assert len(validation) == 3, lines  # before training and after each epoch, once each
    assert validation[-1] < validation[0], validation
    assert checkpoints[-1][1] is not None
    assert checkpoints[-1][1]["validation_loss"] == pytest.approx(validation[-1], abs=1e-4)
