"""The reward Serve application: one app per reward model, holding a scoring engine.

Callers send one conversation per call (`score`, a `ScoringRequest`, answered with its
float); concurrent calls meet in `@serve.batch`, so one engine batch scores many of them.
Like the LLM app, the deployment is a plain class and Serve is applied only in
`build_app` (`serve_apps.reward:build_app` as a Serve config's `import_path`); the
deployment options and batch plumbing are the ones every kind shares
(`serve_apps.deployment`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field
from ray import serve
from ray.serve import Application

from serve_apps.deployment import BatchStats, deployment_options, size_batch_queue
from serve_apps.engines.protocol import ScoringEngine, ScoringRequest
from serve_apps.model_cache import ModelLocation, StorageOptions, local_model_dir
from serve_apps.options import EngineName, ReplicaOptions, ScoreWeights
from serve_apps.vllm_env import vllm_python

DEPLOYMENT_NAME = "RewardServer"


class RewardAppConfig(ReplicaOptions):
    """Everything one reward model's app needs: its weights, how its labels become one
    score, and its `ReplicaOptions`. It travels to the replicas as plain data."""

    name: str = Field(min_length=1, max_length=200)
    # A local directory, or a storage URI that each replica downloads once (model_cache).
    model_dir: ModelLocation
    storage: StorageOptions = StorageOptions()
    # Node-local; None: model_cache's default.
    model_cache_dir: Path | None = None
    # A head with several labels (config.id2label): the score is the sum of weight x
    # logit over these labels. None: the head must have exactly one label, its logit.
    score_weights: ScoreWeights | None = None
    # engine vllm: the vLLM env's interpreter (serve_apps.vllm_env); None: the default one.
    vllm_python: Path | None = None


EngineFactory = Callable[[RewardAppConfig], ScoringEngine]


def transformers_engine(config: RewardAppConfig) -> ScoringEngine:
    from serve_apps.engines.transformers_reward import (
        TransformersRewardEngine,
        TransformersRewardEngineConfig,
    )

    return TransformersRewardEngine(
        TransformersRewardEngineConfig(
            model_dir=local_model_dir(
                config.model_dir, options=config.storage, cache_root=config.model_cache_dir
            ),
            device=config.device,
            dtype=config.dtype,
            score_weights=config.score_weights,
        )
    )


def vllm_engine(config: RewardAppConfig) -> ScoringEngine:
    """vLLM's pooling runner; runs only in the vLLM env (`build_app` puts it there)."""
    from serve_apps.engines.vllm_reward import VLLMRewardEngine, VLLMRewardEngineConfig

    return VLLMRewardEngine(
        VLLMRewardEngineConfig(
            model_dir=local_model_dir(
                config.model_dir, options=config.storage, cache_root=config.model_cache_dir
            ),
            device=config.device,
            dtype=config.dtype,
            score_weights=config.score_weights,
        )
    )


# The engines this app kind has; each imports its heavy modules only when a replica
# builds it.
ENGINES: dict[EngineName, EngineFactory] = {
    "transformers": transformers_engine,
    "vllm": vllm_engine,
}


class RewardServer:
    """One replica: a scoring engine behind a batch queue, and a lock so the engine (not
    thread-safe) scores one batch at a time."""

    def __init__(self, config: RewardAppConfig, engine_factory: EngineFactory) -> None:
        self._engine = engine_factory(config)
        self._engine_lock = threading.Lock()
        self._batches = BatchStats()
        size_batch_queue(self._score_batch, config)

    async def score(self, request: ScoringRequest) -> float:
        """The reward of one conversation (its last message being judged)."""
        self._engine.check(request)  # a bad request fails alone, not its whole batch
        score: float = await self._score_batch(request)
        return score

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, requests: list[ScoringRequest]) -> list[float]:
        self._batches.record(len(requests))
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, requests: list[ScoringRequest]) -> list[float]:
        with self._engine_lock:
            return self._engine.score(requests)

    def stats(self) -> dict[str, Any]:
        """What this replica has done: sizes of its recent batches."""
        return self._batches.stats()


def engine_for(config: RewardAppConfig) -> EngineFactory:
    """The factory of the engine `config` names; ValueError for one this app lacks."""
    factory = ENGINES.get(config.engine)
    if factory is None:
        raise ValueError(
            f"engine {config.engine!r} is not available for reward models (available: "
            f"{', '.join(sorted(ENGINES))})"
        )
    return factory


def build_app(args: dict[str, Any], *, engine_factory: EngineFactory | None = None) -> Application:
    """The Serve application for one reward model (`args` is a `RewardAppConfig` as a
    dict), with the engine its config names unless `engine_factory` is given."""
    config = RewardAppConfig.model_validate(args)
    python = vllm_python(config.vllm_python) if config.engine == "vllm" else None
    options = deployment_options(config, name=DEPLOYMENT_NAME, python_executable=python)
    deployment = serve.deployment(**options)(RewardServer)
    return deployment.bind(config, engine_factory or engine_for(config))
