"""The LLM Serve application: one app per model, holding a generation engine.

Unary requests and streams go through the replica's scheduler (`serve_apps.scheduler`):
a request starts at once on an idle engine and joins the running batch between decode
steps on a busy one, so concurrent callers, streams included, share the engine's batch.
The deployment is a plain class; Serve is applied only in `build_app`, which a Serve
config's `import_path` (`serve_apps.llm:build_app`) can name."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from pydantic import Field
from ray import serve
from ray.serve import Application

from serve_apps.deployment import deployment_options as shared_deployment_options
from serve_apps.engines.protocol import (
    AdapterRef,
    AsyncGenerationEngine,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    TokenCounter,
    TokenDelta,
)
from serve_apps.model_cache import ModelLocation, StorageOptions, local_model_dir
from serve_apps.options import EngineName, ReplicaOptions
from serve_apps.scheduler import GenerationScheduler
from serve_apps.scheduler import stats as scheduler_stats
from serve_apps.vllm_env import vllm_python

DEPLOYMENT_NAME = "LLMServer"
log = logging.getLogger(__name__)


class LLMAppConfig(ReplicaOptions):
    """Everything one model's app needs: its weights and its `ReplicaOptions`. It travels
    to the replicas as plain data."""

    name: str = Field(min_length=1, max_length=200)
    # A local directory, or a storage URI that each replica downloads once (model_cache).
    model_dir: ModelLocation
    adapter_dir: ModelLocation | None = None
    storage: StorageOptions = StorageOptions()
    # Node-local; None: model_cache's default.
    model_cache_dir: Path | None = None
    # engine vllm: the vLLM env's interpreter (serve_apps.vllm_env); None: the default one.
    vllm_python: Path | None = None

    @property
    def app_name(self) -> str:
        return f"llm-{self.name}"


EngineFactory = Callable[[LLMAppConfig], GenerationEngine | AsyncGenerationEngine]


def transformers_engine(config: LLMAppConfig) -> GenerationEngine:
    from serve_apps.engines.transformers_engine import (
        TransformersEngine,
        TransformersEngineConfig,
    )

    def local(location: Path | str) -> Path:
        return local_model_dir(location, options=config.storage, cache_root=config.model_cache_dir)

    return TransformersEngine(
        TransformersEngineConfig(
            model_dir=local(config.model_dir),
            adapter_dir=local(config.adapter_dir) if config.adapter_dir is not None else None,
            device=config.device,
            dtype=config.dtype,
        )
    )


def vllm_engine(config: LLMAppConfig) -> AsyncGenerationEngine:
    """vLLM's async engine; runs only in the vLLM env (`deployment_options` puts the
    replica there)."""
    from serve_apps.deployment import tensor_parallel_size
    from serve_apps.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

    if config.adapter_dir is not None:
        raise ValueError(
            "engine vllm serves adapters registered over a running base model (its "
            "max_adapters), not one merged in: use engine transformers for that"
        )

    def local(location: Path | str) -> Path:
        return local_model_dir(location, options=config.storage, cache_root=config.model_cache_dir)

    return VLLMEngine(
        VLLMEngineConfig(
            model_dir=local(config.model_dir),
            device=config.device,
            dtype=config.dtype,
            tensor_parallel_size=tensor_parallel_size(config),
            # max_batch_size is the most requests vLLM steps together (its max_num_seqs).
            max_num_seqs=config.max_batch_size,
            max_adapters=config.max_adapters,
            adapters_per_tenant=config.adapters_per_tenant,
            max_adapter_rank=config.max_adapter_rank,
        ),
        local_adapter=local,
    )


# The engines this app kind has; each imports its heavy modules only when a replica
# builds it.
ENGINES: dict[EngineName, EngineFactory] = {
    "transformers": transformers_engine,
    "vllm": vllm_engine,
}


_DONE = object()
CALLER_CHECK_S = 1.0  # how often a stream asks whether its caller still lives


class CallerGone(Exception):
    """A stream stopped because its caller's lease died (so the caller had)."""


class CallerLease:
    """A Ray actor that lives exactly as long as the process that created it: Ray kills
    an actor when its owner dies, and restarts it (max_restarts) for any other death.
    A replica asks it `alive` while it streams to that process."""

    def alive(self) -> bool:
        return True


def create_caller_lease() -> Any:
    """A new lease owned by this process (which must be connected to Ray)."""
    import ray

    options: Any = {"num_cpus": 0, "max_restarts": -1, "max_task_retries": -1}
    return ray.remote(**options)(CallerLease).remote()


async def _watch(caller: Any, cancelled: threading.Event) -> bool:
    """Until `cancelled`: ask `caller` (a CallerLease) every CALLER_CHECK_S whether it
    lives. True, with `cancelled` set, once it has died; a slow or restarting lease is
    no verdict."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    while not cancelled.is_set():
        try:
            await asyncio.wait_for(caller.alive.remote(), timeout=CALLER_CHECK_S * 5)
        except (TimeoutError, ActorUnavailableError):
            pass
        except RayActorError:
            log.info("a stream's caller died: stopping its generation")
            cancelled.set()
            return True
        await asyncio.sleep(CALLER_CHECK_S)
    return False


class LLMServer:
    """One replica: an engine and what feeds it. A batch engine (transformers) is fed by
    the replica's scheduler, which batches its requests; an engine that batches by
    itself (vLLM) takes each request as it comes (`_generate_direct`, `_stream_direct`)."""

    def __init__(self, config: LLMAppConfig, engine_factory: EngineFactory) -> None:
        self._config = config
        engine = engine_factory(config)
        self._engine = engine
        self._async_engine = engine if isinstance(engine, AsyncGenerationEngine) else None
        self._scheduler = (
            None
            if self._async_engine is not None
            else GenerationScheduler(
                cast(GenerationEngine, engine), max_batch_size=config.max_batch_size
            )
        )

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run `request` in the engine's batch; a bad request fails alone."""
        request = with_routed_adapter(request)
        if self._async_engine is not None:
            return await self._generate_direct(self._async_engine, request)
        assert self._scheduler is not None
        return await self._scheduler.generate(request)

    async def stream(
        self, request: GenerationRequest, caller: Any = None
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """Yield the engine's stream as it is produced; the request leaves the engine's
        batch when the caller goes away, before the next step. Serve cancels this
        generator when the caller cancels its response (the API's client disconnected).
        When the caller's process dies nothing tells Serve or Ray to stop (Ray only logs
        that it cannot deliver the items), so the caller may pass its `CallerLease`: a
        lease that has died means the caller has, and the stream stops."""
        request = with_routed_adapter(request)
        if self._async_engine is not None:
            async for each in self._stream_direct(self._async_engine, request, caller):
                yield each
            return
        assert self._scheduler is not None
        cancelled = threading.Event()
        watch = asyncio.ensure_future(_watch(caller, cancelled)) if caller is not None else None
        try:
            async for item in self._scheduler.stream(request, cancelled):
                yield item
            if watch is not None and watch.done() and not watch.cancelled() and watch.result():
                raise CallerGone("the caller's process died; the stream was stopped")
        finally:
            cancelled.set()
            if watch is not None:
                watch.cancel()

    async def _generate_direct(
        self, engine: AsyncGenerationEngine, request: GenerationRequest
    ) -> GenerationResult:
        """No batch queue, no lock, no thread: the engine batches the request with whatever
        else it runs. A caller that cancels cancels this, which aborts it in the engine."""
        engine.check(request)
        return await engine.generate_one(request)

    async def _stream_direct(
        self, engine: AsyncGenerationEngine, request: GenerationRequest, caller: Any
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """`stream` for an engine that batches by itself: the same caller semantics (a
        dead `CallerLease` stops it at the next token, with CallerGone), and closing the
        engine's stream aborts the request there."""
        engine.check(request)
        cancelled = threading.Event()
        watch = asyncio.ensure_future(_watch(caller, cancelled)) if caller is not None else None
        stream = engine.stream_one(request)
        try:
            async for item in stream:
                if cancelled.is_set():
                    break
                yield item
            if watch is not None and watch.done() and not watch.cancelled() and watch.result():
                raise CallerGone("the caller's process died; the stream was stopped")
        finally:
            cancelled.set()
            if watch is not None:
                watch.cancel()
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    def prompt_tokens(self, prompts: list[str]) -> dict[str, Any] | None:
        """The engine's context window and each prompt's length in its tokens, or None
        for an engine that cannot count (TokenCounter). Tokenizing needs no engine lock,
        as `check` does not."""
        if not isinstance(self._engine, TokenCounter):
            return None
        return {
            "context_window": self._engine.context_window,
            "counts": [self._engine.count_tokens(prompt) for prompt in prompts],
        }

    def stats(self) -> dict[str, Any]:
        """What this replica has done: how many requests joined its engine together
        (the last 1000 groups) and the most rows one decode step ran; for an engine that
        batches by itself, what it reports (vLLM: unfinished and aborted requests, the
        adapters it holds)."""
        if self._scheduler is not None:
            return scheduler_stats(self._scheduler)
        engine_stats = getattr(self._async_engine, "stats", None)
        return {"engine": engine_stats()} if engine_stats is not None else {}


def with_routed_adapter(request: GenerationRequest) -> GenerationRequest:
    """`request` with the adapter its caller routed it with: the control plane sends a
    request for an adapter riding on this model through a handle whose multiplexed model
    id is the adapter (`AdapterRef.key`), so that every caller that takes a handle from
    the resolver sends the adapter without knowing of it. An adapter the request itself
    names wins."""
    if request.adapter is not None:
        return request
    key = serve.get_multiplexed_model_id()
    return replace(request, adapter=AdapterRef.from_key(key)) if key else request


def deployment_options(config: LLMAppConfig) -> dict[str, Any]:
    """Serve options for a model's LLM deployment (`serve_apps.deployment`); an `engine:
    vllm` replica runs in the vLLM env (VLLMEnvironmentMissing when there is none)."""
    python = vllm_python(config.vllm_python) if config.engine == "vllm" else None
    return shared_deployment_options(config, name=DEPLOYMENT_NAME, python_executable=python)


def engine_for(config: LLMAppConfig) -> EngineFactory:
    """The factory of the engine `config` names; ValueError for one this app lacks."""
    factory = ENGINES.get(config.engine)
    if factory is None:
        raise ValueError(
            f"engine {config.engine!r} is not available for LLMs (available: "
            f"{', '.join(sorted(ENGINES))})"
        )
    return factory


def build_app(args: dict[str, Any], *, engine_factory: EngineFactory | None = None) -> Application:
    """The Serve application for one model (`args` is an `LLMAppConfig` as a dict), with
    the engine its config names unless `engine_factory` is given (tests inject one)."""
    config = LLMAppConfig.model_validate(args)
    deployment = serve.deployment(**deployment_options(config))(LLMServer)
    return deployment.bind(config, engine_factory or engine_for(config))
