"""What every model kind's Serve app shares: its deployment options (resources,
autoscaling, queue limits, from `ReplicaOptions`) and a replica's batch plumbing (the
`@serve.batch` queue sized from the config, and the recent batch sizes `stats` reports).
Each app (`serve_apps.llm`, `serve_apps.reward`) keeps only what is its own."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path
from typing import Any

from serve_apps.options import ReplicaOptions


def deployment_options(
    config: ReplicaOptions, *, name: str, python_executable: Path | None = None
) -> dict[str, Any]:
    """Serve options for the deployment `name` of a model's app; scaling on demand
    redeploys with new ones in place. `python_executable`: the interpreter of the env the
    replicas run in (an `engine: vllm` model's, serve_apps.vllm_env), if not the cluster's."""
    autoscaling: dict[str, Any] = {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
        "look_back_period_s": config.look_back_period_s,
    }
    if config.initial_replicas is not None:
        autoscaling["initial_replicas"] = config.initial_replicas
    actor: dict[str, Any] = {
        "num_cpus": config.cpus_per_replica,
        "num_gpus": config.gpus_per_replica,
    }
    if python_executable is not None:
        actor["runtime_env"] = {"py_executable": str(python_executable)}
    options: dict[str, Any] = {"name": name, "ray_actor_options": actor}
    if config.engine == "vllm" and config.gpus_per_replica > 1:
        options |= tensor_parallel_placement(config)
        actor["num_gpus"] = 0  # the GPUs are the vLLM workers', one bundle each
    return options | {
        "autoscaling_config": autoscaling,
        "max_ongoing_requests": max_ongoing_requests(config),
        "max_queued_requests": config.max_queued_requests,
    }


def tensor_parallel_size(config: ReplicaOptions) -> int:
    """How many GPUs a vLLM replica shards its model over: all of its GPUs (a whole
    number), or 1 with one GPU, a fraction of one, or none (CPU)."""
    gpus = config.gpus_per_replica
    if gpus <= 1:
        return 1
    if not gpus.is_integer():
        raise ValueError(
            f"gpus_per_replica {gpus} cannot be split for tensor parallelism: give a "
            "whole number of GPUs (or at most one)"
        )
    return int(gpus)


def tensor_parallel_placement(config: ReplicaOptions) -> dict[str, Any]:
    """A tensor-parallel vLLM replica's placement group: one bundle per GPU (one vLLM
    worker each), the replica's own CPUs in the first, all on one node (STRICT_PACK: the
    shards talk over NVLink/PCIe at every layer, never over the network)."""
    size = tensor_parallel_size(config)
    bundles = [{"CPU": config.cpus_per_replica, "GPU": 1.0}] + [{"GPU": 1.0}] * (size - 1)
    return {"placement_group_bundles": bundles, "placement_group_strategy": "STRICT_PACK"}


def max_ongoing_requests(config: ReplicaOptions) -> int:
    """What a replica accepts at once: a whole batch (or batches are cut short) and a
    queue of `max_queued_requests` more behind it, which the replica takes from as soon
    as its engine has room. Requests wait on the replica, not in the caller's router:
    Serve's router, when every replica is at this limit, retries with a back-off that
    grows to 0.5 s, so a replica that frees a place sits idle until a retry comes (with
    64 closed-loop clients on 2 replicas of 8, bench/queueing.py measured 38 against 164
    requests/s, p99 2.9 s against 0.7 s).
    Beyond this, up to `max_queued_requests` wait in each caller's router; past those,
    callers get BackPressureError at once."""
    batch = max(config.max_batch_size, math.ceil(config.target_ongoing_requests))
    return batch + config.max_queued_requests


class BatchStats:
    """The sizes of a replica's recent batches (the last 1000), what `stats` reports."""

    def __init__(self) -> None:
        self._sizes: deque[int] = deque(maxlen=1000)

    def record(self, size: int) -> None:
        self._sizes.append(size)

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self._sizes)}


def size_batch_queue(batch_method: Any, config: ReplicaOptions) -> None:
    """Give a replica's `@serve.batch` method the config's limits: the decorator fixes
    its own at class definition, so each replica sets them from its config."""
    batch_method.set_max_batch_size(config.max_batch_size)
    batch_method.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
