"""What a job holds on the cluster while it runs: its *need*, one Ray resource amount per
name (`{"GPU": 2.0}`), read from its kind and launch config.

The recipes reserve exactly this (jobs/attempts.py passes `worker_resources` to Ray
Train's ScalingConfig; jobs/sdg/pipeline.py gives each stage's actor `SDG_STAGE_CPUS`), and
the API's admission (corral/services/admission.py) counts it, so the two cannot drift
apart. Plain Python: the API process imports it.

- Training (SFT, DPO): `num_workers` Ray Train workers, each one GPU when `use_gpu`, else
  one CPU (Ray Train's own default per worker; its V2 controller and the job's driver
  reserve nothing).
- Synthetic data: one actor per pipeline stage, `SDG_STAGE_CPUS` each; the model apps it
  calls are Serve's, sized and counted apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Need = dict[str, float]

TRAINING_KINDS = frozenset({"supervised_fine_tune", "preference_optimize"})
SYNTHETIC_DATA_KIND = "synthetic_data_generation"
# CPUs each synthetic data stage's actor reserves: Generate and Score only wait on Serve,
# and Filter is a few comparisons per prompt; the replicas need the cores.
SDG_STAGE_CPUS = 0.05
SDG_STAGES = 3


def worker_resources(use_gpu: bool) -> Need:
    """What one Ray Train worker reserves."""
    return {"GPU": 1.0} if use_gpu else {"CPU": 1.0}


def training_need(num_workers: int, use_gpu: bool) -> Need:
    return {name: amount * num_workers for name, amount in worker_resources(use_gpu).items()}


def job_need(kind: str, launch: Mapping[str, Any] | None) -> Need:
    """The need of a job of `kind` with this launch config (as stored on its row)."""
    if kind in TRAINING_KINDS:
        launch = launch or {}
        return training_need(int(launch.get("num_workers", 2)), bool(launch.get("use_gpu")))
    if kind == SYNTHETIC_DATA_KIND:
        return {"CPU": round(SDG_STAGES * SDG_STAGE_CPUS, 6)}
    raise ValueError(f"no resource need known for job kind {kind!r}")
