"""A no-op Ray Train V2 `fit()`: the floor that a fine-tuning job's start-up is measured
against (bench/training.py). N workers whose train loop only records when it began; it
imports nothing a plain `TorchTrainer` does not.

    python bench/noop_fit.py --workers 2 --out times.json

bench/training.py runs it both in its own process (connected to the cluster) and
submitted as a Ray job, so that Ray Jobs' own start-up is measured too. The JSON holds
`time.time()` stamps: `process` (this process started), `fit` (fit() called), `loop`
(rank 0 entered the train loop), `done` (fit() returned). `WarmDriver` runs it in an actor
started beforehand.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import ray.train
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer


def noop_loop(config: dict[str, Any]) -> None:
    if ray.train.get_context().get_world_rank() == 0:
        Path(config["loop_file"]).write_text(f"{time.time():.6f}")


def run(workers: int) -> dict[str, float]:
    """One no-op fit() on `workers` CPU workers; its timestamps."""
    with tempfile.TemporaryDirectory(prefix="corral-noop-") as work:
        loop_file = Path(work) / "loop"
        fit_at = time.time()
        TorchTrainer(
            noop_loop,
            train_loop_config={"loop_file": str(loop_file)},
            scaling_config=ScalingConfig(num_workers=workers),
            run_config=RunConfig(name=f"noop-{uuid.uuid4().hex[:8]}", storage_path=work),
        ).fit()
        done_at = time.time()
        return {
            "process": float(psutil.Process().create_time()),
            "fit": fit_at,
            "loop": float(loop_file.read_text()),
            "done": done_at,
        }


@ray.remote(num_cpus=0)
class WarmDriver:
    """A driver that is already up: its own process, connected, Ray Train imported. What a
    job would start from if Corral kept one waiting (see bench/training.py's output)."""

    def ready(self) -> bool:
        return True

    def run(self, workers: int) -> dict[str, float]:
        return run(workers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.write_text(json.dumps(run(args.workers)))


if __name__ == "__main__":
    main()
