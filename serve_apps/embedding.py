"""The embedding Serve application: one app per embedding model, holding an embedding
engine.

Callers send one text per call (`embed`, answered with its unit vector); concurrent
calls meet in `@serve.batch`, so one engine batch embeds many of them (a memory bank's
insert sends all its chunks at once). `info` says the vectors' dimension and the most
tokens a text may have; `token_spans` is how chunking counts tokens in the model's own
tokenizer. Like the LLM and reward apps, the deployment is a plain class and Serve is
applied only in `build_app` (`serve_apps.embedding:build_app` as a Serve config's
`import_path`), with the options and batch plumbing every kind shares
(`serve_apps.deployment`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from ray import serve
from ray.serve import Application

from serve_apps.deployment import BatchStats, deployment_options, size_batch_queue
from serve_apps.engines.protocol import EmbeddingEngine
from serve_apps.model_cache import ModelLocation, StorageOptions, local_model_dir
from serve_apps.options import EngineName, ReplicaOptions
from serve_apps.vllm_env import vllm_python

DEPLOYMENT_NAME = "EmbeddingServer"
T = TypeVar("T")


class EmbeddingAppConfig(ReplicaOptions):
    """Everything one embedding model's app needs: its weights and its `ReplicaOptions`.
    It travels to the replicas as plain data."""

    name: str = Field(min_length=1, max_length=200)
    # A sentence-transformers directory, or a storage URI each replica downloads once.
    model_dir: ModelLocation
    storage: StorageOptions = StorageOptions()
    # Node-local; None: model_cache's default.
    model_cache_dir: Path | None = None
    # engine vllm: the vLLM env's interpreter (serve_apps.vllm_env); None: the default one.
    vllm_python: Path | None = None


EngineFactory = Callable[[EmbeddingAppConfig], EmbeddingEngine]


def sentence_transformers_engine(config: EmbeddingAppConfig) -> EmbeddingEngine:
    from serve_apps.engines.sentence_transformers_embedding import (
        SentenceTransformersEmbeddingEngine,
        SentenceTransformersEngineConfig,
    )

    return SentenceTransformersEmbeddingEngine(
        SentenceTransformersEngineConfig(
            model_dir=local_model_dir(
                config.model_dir, options=config.storage, cache_root=config.model_cache_dir
            ),
            device=config.device,
            dtype=config.dtype,
        )
    )


def vllm_embedding_engine(config: EmbeddingAppConfig) -> EmbeddingEngine:
    """vLLM's pooling runner; runs only in the vLLM env (`build_app` puts it there)."""
    from serve_apps.engines.vllm_embedding import VLLMEmbeddingEngine, VLLMEmbeddingEngineConfig

    return VLLMEmbeddingEngine(
        VLLMEmbeddingEngineConfig(
            model_dir=local_model_dir(
                config.model_dir, options=config.storage, cache_root=config.model_cache_dir
            ),
            device=config.device,
            dtype=config.dtype,
        )
    )


# The engines this app kind has, each importing its heavy modules only when a replica
# builds it. sentence-transformers runs on transformers, hence the engine's name (the
# one every kind's `engine` option defaults to).
ENGINES: dict[EngineName, EngineFactory] = {
    "transformers": sentence_transformers_engine,
    "vllm": vllm_embedding_engine,
}


class EmbeddingServer:
    """One replica: an embedding engine behind a batch queue, and a lock so the engine
    (not thread-safe) does one thing at a time: a batch, or one text's check or spans."""

    def __init__(self, config: EmbeddingAppConfig, engine_factory: EngineFactory) -> None:
        self._engine = engine_factory(config)
        self._engine_lock = threading.Lock()
        self._batches = BatchStats()
        size_batch_queue(self._embed_batch, config)

    async def embed(self, text: str) -> list[float]:
        """The unit vector of one text."""
        # A bad text fails alone, not its whole batch. The engine's tokenizer is busy
        # while a batch runs, so this waits its turn off the event loop.
        await asyncio.to_thread(self._locked, self._engine.check, text)
        vector: list[float] = await self._embed_batch(text)
        return vector

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, texts: list[str]) -> list[list[float]]:
        self._batches.record(len(texts))
        return await asyncio.to_thread(self._run_batch, texts)

    def _run_batch(self, texts: list[str]) -> list[list[float]]:
        with self._engine_lock:
            return self._engine.embed(texts)

    def info(self) -> dict[str, int]:
        """{"dimension": ..., "max_tokens": ...} of this replica's model."""
        info = self._engine.info
        return {"dimension": info.dimension, "max_tokens": info.max_tokens}

    async def token_spans(self, text: str) -> list[list[int]]:
        """[start, end] character spans of the tokens the model sees in `text`."""
        spans = await asyncio.to_thread(self._locked, self._engine.token_spans, text)
        return [[start, end] for start, end in spans]

    def _locked(self, call: Callable[[str], T], text: str) -> T:
        with self._engine_lock:
            return call(text)

    def stats(self) -> dict[str, Any]:
        """What this replica has done: sizes of its recent batches."""
        return self._batches.stats()


def engine_for(config: EmbeddingAppConfig) -> EngineFactory:
    """The factory of the engine `config` names; ValueError for one this app lacks."""
    factory = ENGINES.get(config.engine)
    if factory is None:
        raise ValueError(
            f"engine {config.engine!r} is not available for embedding models (available: "
            f"{', '.join(sorted(ENGINES))})"
        )
    return factory


def build_app(args: dict[str, Any], *, engine_factory: EngineFactory | None = None) -> Application:
    """The Serve application for one embedding model (`args` is an `EmbeddingAppConfig`
    as a dict), with the engine its config names unless `engine_factory` is given."""
    config = EmbeddingAppConfig.model_validate(args)
    python = vllm_python(config.vllm_python) if config.engine == "vllm" else None
    options = deployment_options(config, name=DEPLOYMENT_NAME, python_executable=python)
    deployment = serve.deployment(**options)(EmbeddingServer)
    return deployment.bind(config, engine_factory or engine_for(config))
