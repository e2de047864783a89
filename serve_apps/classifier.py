"""The classifier Serve application: one app per sequence classifier (Prompt Guard and
the like), holding a classification engine.

Callers send one text per call (`classify`, answered with its label probabilities in
`info()["labels"]` order); concurrent calls meet in `@serve.batch`, so one engine batch
classifies many. `token_spans` gives the character span of each token, which is how a
caller splits text longer than `info()["max_tokens"]` into windows. Like the other
kinds, the deployment is a plain class and Serve is applied only in `build_app`
(`serve_apps.classifier:build_app` as a Serve config's `import_path`)."""

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
from serve_apps.engines.protocol import ClassificationEngine
from serve_apps.model_cache import ModelLocation, StorageOptions, local_model_dir
from serve_apps.options import EngineName, ReplicaOptions

DEPLOYMENT_NAME = "ClassifierServer"
T = TypeVar("T")


class ClassifierAppConfig(ReplicaOptions):
    """Everything one classifier's app needs: its weights and its `ReplicaOptions`."""

    name: str = Field(min_length=1, max_length=200)
    # A local directory, or a storage URI that each replica downloads once (model_cache).
    model_dir: ModelLocation
    storage: StorageOptions = StorageOptions()
    model_cache_dir: Path | None = None


EngineFactory = Callable[[ClassifierAppConfig], ClassificationEngine]


def transformers_engine(config: ClassifierAppConfig) -> ClassificationEngine:
    from serve_apps.engines.transformers_classifier import (
        TransformersClassifierEngine,
        TransformersClassifierEngineConfig,
    )

    return TransformersClassifierEngine(
        TransformersClassifierEngineConfig(
            model_dir=local_model_dir(
                config.model_dir, options=config.storage, cache_root=config.model_cache_dir
            ),
            device=config.device,
            dtype=config.dtype,
        )
    )


ENGINES: dict[EngineName, EngineFactory] = {"transformers": transformers_engine}


class ClassifierServer:
    """One replica: a classification engine behind a batch queue, and a lock so the
    engine (its tokenizer included: not thread-safe) does one thing at a time."""

    def __init__(self, config: ClassifierAppConfig, engine_factory: EngineFactory) -> None:
        self._engine = engine_factory(config)
        self._engine_lock = threading.Lock()
        self._batches = BatchStats()
        size_batch_queue(self._classify_batch, config)

    async def classify(self, text: str) -> list[float]:
        """The probability of each label for `text`, in `info()["labels"]` order."""
        await self._locked(self._engine.check, text)  # a bad text fails alone
        probabilities: list[float] = await self._classify_batch(text)
        return probabilities

    def info(self) -> dict[str, Any]:
        """The model's labels (in id order) and its window in text tokens."""
        info = self._engine.info
        return {"labels": list(info.labels), "max_tokens": info.max_tokens}

    async def token_spans(self, text: str) -> list[list[int]]:
        """The [start, end) character span of each token of `text` (no special tokens)."""
        spans = await self._locked(self._engine.token_spans, text)
        return [[start, end] for start, end in spans]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _classify_batch(self, texts: list[str]) -> list[list[float]]:
        self._batches.record(len(texts))
        return await self._locked(self._engine.classify, texts)

    async def _locked(self, function: Callable[[Any], T], argument: Any) -> T:
        def run() -> T:
            with self._engine_lock:
                return function(argument)

        return await asyncio.to_thread(run)

    def stats(self) -> dict[str, Any]:
        """What this replica has done: sizes of its recent batches."""
        return self._batches.stats()


def engine_for(config: ClassifierAppConfig) -> EngineFactory:
    """The factory of the engine `config` names; ValueError for one this app lacks."""
    factory = ENGINES.get(config.engine)
    if factory is None:
        raise ValueError(
            f"engine {config.engine!r} is not available for classifiers (available: "
            f"{', '.join(sorted(ENGINES))})"
        )
    return factory


def build_app(args: dict[str, Any], *, engine_factory: EngineFactory | None = None) -> Application:
    """The Serve application for one classifier (`args` is a `ClassifierAppConfig` as a
    dict), with the engine its config names unless `engine_factory` is given."""
    config = ClassifierAppConfig.model_validate(args)
    deployment = serve.deployment(**deployment_options(config, name=DEPLOYMENT_NAME))(
        ClassifierServer
    )
    return deployment.bind(config, engine_factory or engine_for(config))
