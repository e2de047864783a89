"""What every model kind's Serve app shares: its deployment options (resources,
autoscaling, queue limits, from `ReplicaOptions`) and a replica's batch plumbing (the
`@serve.batch` queue sized from the config, and the recent batch sizes `stats` reports).
Each app (`serve_apps.llm`, `serve_apps.reward`) keeps only what is its own."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from serve_apps.options import ReplicaOptions


def deployment_options(config: ReplicaOptions, *, name: str) -> dict[str, Any]:
    """Serve options for the deployment `name` of a model's app; scaling on demand
    redeploys with new ones in place."""
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
    return {
        "name": name,
        "ray_actor_options": {
            "num_cpus": config.cpus_per_replica,
            "num_gpus": config.gpus_per_replica,
        },
        "autoscaling_config": autoscaling,
        # A replica must accept a whole batch at once, or batches are cut short.
        "max_ongoing_requests": max(
            config.max_batch_size, math.ceil(config.target_ongoing_requests)
        ),
        "max_queued_requests": config.max_queued_requests,
    }


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
