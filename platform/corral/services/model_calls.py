"""Calls to a model's Serve app through its handle, shared by the spec's inference
service and the OpenAI-compatible one. What a call can fail with becomes a domain error
that says whose fault it is:

- the engine refused the request (`EngineRequestError`, the engine protocol's own type):
  InvalidRequest, 422, with the engine's message;
- the model cannot answer now: its queue is full, or every adapter slot of its replica is
  busy (Overloaded), or its replica died, is
  unreachable, ran out of memory, or its app failed to start (ModelUnavailable); 503 with
  `Retry-After` either way;
- anything else raised inside the replica is a bug in the engine: EngineFailed, 500,
  logged here with the replica's own traceback (the client sees no internals).

A stream closed early (its client went away) cancels its generation on the replica; a
stream whose API process dies is stopped by the replica itself, through this process's
lease (see `serve_apps.llm.CallerLease`)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from ray.exceptions import (
    ActorUnschedulableError,
    LocalRayletDiedError,
    NodeDiedError,
    OutOfMemoryError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from corral.errors import EngineFailed, InvalidRequest, Overloaded
from corral.observability.metrics import count_generated_tokens
from corral.serving.deployer import ModelUnavailable
from serve_apps.adapters import AdapterSlotsBusy
from serve_apps.engines.protocol import (
    ClassifierInfo,
    EmbeddingInfo,
    EngineRequestError,
    GenerationRequest,
    GenerationResult,
    TokenDelta,
)
from serve_apps.llm import create_caller_lease

T = TypeVar("T")
log = logging.getLogger(__name__)

# How many calls one API request has in flight on a model at once (its batch's prompts,
# a memory bank's chunks, scored pairs): enough to fill several replica batches (a
# replica takes up to its `max_batch_size`), few enough that a large request does not hit
# the app's queue bound (`max_queued_requests`, 64 by default) by itself and get refused
# as overload, which retrying could never cure.
CALLS_IN_FLIGHT = 32
# The most items (prompts, dialogs, scored generations) one batch request may carry: past
# this it is refused at once (422) instead of occupying the model for minutes.
MAX_BATCH_ITEMS = 1024
# A replica restarts (or a new one starts) in seconds: ask clients to wait that long.
UNAVAILABLE_RETRY_AFTER_S = 5
# The replica (or its node) is gone or cannot be placed: nothing the request did.
_REPLICA_GONE: tuple[type[BaseException], ...] = (
    RayActorError,  # ActorDiedError, ActorUnavailableError
    WorkerCrashedError,
    NodeDiedError,
    LocalRayletDiedError,
    OutOfMemoryError,  # Ray's memory monitor killed the replica's worker
    ActorUnschedulableError,
    DeploymentUnavailableError,  # the app failed to deploy
    ReplicaUnavailableError,
)


def _out_of_memory(error: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError, without importing torch into the API process.
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def _unavailable(error: BaseException) -> ModelUnavailable:
    lines = str(getattr(error, "message", "") or error).strip().splitlines()
    detail = lines[0][:300] if lines else ""
    return ModelUnavailable(
        f"the model's replica is unavailable, try again shortly ({type(error).__name__}: {detail})",
        retry_after_s=UNAVAILABLE_RETRY_AFTER_S,
    )


async def call_model(awaitable: Awaitable[T]) -> T:
    """Await a handle call, turning what it fails with into domain errors (see above)."""
    try:
        return await awaitable
    except BackPressureError as exc:
        raise Overloaded(f"the model is at capacity, try again shortly ({exc})") from None
    except _REPLICA_GONE as exc:
        raise _unavailable(exc) from None
    except RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, EngineRequestError):
            raise InvalidRequest(str(cause)) from None
        if isinstance(cause, BackPressureError | AdapterSlotsBusy):
            raise Overloaded(f"the model is at capacity, try again shortly ({cause})") from None
        if isinstance(cause, _REPLICA_GONE) or _out_of_memory(cause):
            raise _unavailable(cause) from None
        # str(RayTaskError) carries the replica's traceback.
        log.error("the model's engine failed inside its replica:\n%s", exc)
        raise EngineFailed(
            f"the model's engine failed ({type(cause).__name__}); the error is logged"
        ) from None


class ProcessLease:
    """This process's CallerLease, made at the first stream (not at import) and kept
    for the process's life, which is what it stands for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lease: Any = None

    def get(self) -> Any:
        import ray

        if not ray.is_initialized():
            return None
        with self._lock:
            if self._lease is None:
                self._lease = create_caller_lease()
            return self._lease


PROCESS_LEASE = ProcessLease()


def _application(handle: DeploymentHandle[Any]) -> str | None:
    """The Serve application behind `handle` (the label Ray Serve's metrics use too)."""
    name = getattr(handle, "app_name", None)
    return name if isinstance(name, str) else None


async def generate(handle: DeploymentHandle[Any], request: GenerationRequest) -> GenerationResult:
    result: GenerationResult = await call_model(handle.generate.remote(request))
    count_generated_tokens(_application(handle), len(result.token_ids))
    return result


async def stream_generation(
    handle: DeploymentHandle[Any], request: GenerationRequest
) -> AsyncGenerator[TokenDelta | GenerationResult, None]:
    """The engine's stream. Closing this generator early, or cancelling the task that
    iterates it (Starlette does when the client disconnects), cancels the request on
    the replica, which stops decoding at its next token."""
    stream = handle.options(stream=True).stream.remote(request, PROCESS_LEASE.get())
    assert isinstance(stream, DeploymentResponseGenerator)
    iterator = stream.__aiter__()
    finished = False
    # Tokens: the engine's count when the stream ends with its result, else (a stream
    # cut short) the deltas that came, one per token.
    streamed, generated = 0, None
    try:
        while True:
            try:
                item = await call_model(iterator.__anext__())
            except StopAsyncIteration:
                finished = True
                return
            if isinstance(item, GenerationResult):
                generated = len(item.token_ids)
            else:
                streamed += 1
            yield item
    finally:
        count_generated_tokens(_application(handle), streamed if generated is None else generated)
        if not finished:
            stream.cancel()  # type: ignore[no-untyped-call]


def check_batch_size(count: int, what: str) -> None:
    """InvalidRequest when a batch request carries more than MAX_BATCH_ITEMS `what`."""
    if count > MAX_BATCH_ITEMS:
        raise InvalidRequest(
            f"a request may carry at most {MAX_BATCH_ITEMS} {what}, this one has {count}: "
            "split it into several requests"
        )


async def call_each(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Run every call, at most CALLS_IN_FLIGHT at a time, so that the replicas batch
    them; results in order. The first failure fails the whole and cancels the rest
    (their requests leave the replicas' batches)."""
    limit = asyncio.Semaphore(CALLS_IN_FLIGHT)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with limit:
            return await call()

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # the others, when one failed (a no-op for finished ones)


async def generate_each(
    handle: DeploymentHandle[Any], requests: Sequence[GenerationRequest]
) -> list[GenerationResult]:
    """`generate` for each request (`call_each`); results in request order."""
    return await call_each([partial(generate, handle, request) for request in requests])


async def embed(handle: DeploymentHandle[Any], texts: Sequence[str]) -> list[list[float]]:
    """The unit vector of each text, in order (`call_each`); a text the model refuses
    fails the call with InvalidRequest naming its index."""

    async def one(index: int, text: str) -> list[float]:
        try:
            vector: list[float] = await call_model(handle.embed.remote(text))
        except InvalidRequest as exc:
            raise InvalidRequest(f"text {index}: {exc}") from None
        return vector

    return await call_each([partial(one, index, text) for index, text in enumerate(texts)])


async def embedding_info(handle: DeploymentHandle[Any]) -> EmbeddingInfo:
    """The embedding model's vector dimension and the most tokens a text may have."""
    info: dict[str, int] = await call_model(handle.info.remote())
    return EmbeddingInfo(dimension=int(info["dimension"]), max_tokens=int(info["max_tokens"]))


async def token_spans(handle: DeploymentHandle[Any], text: str) -> list[tuple[int, int]]:
    """The [start, end) character span of each token the embedding model sees in `text`
    (special tokens left out)."""
    spans: list[list[int]] = await call_model(handle.token_spans.remote(text))
    return [(int(start), int(end)) for start, end in spans]


async def classify(handle: DeploymentHandle[Any], texts: list[str]) -> list[list[float]]:
    """Label probabilities for each text from a classifier app (`serve_apps.classifier`),
    sent together (`call_each`) so that its replicas batch them; rows in text order."""

    async def one(text: str) -> list[float]:
        row: list[float] = await call_model(handle.classify.remote(text))
        return row

    return await call_each([partial(one, text) for text in texts])


async def classifier_info(handle: DeploymentHandle[Any]) -> ClassifierInfo:
    """A classifier app's labels (in id order) and window in text tokens."""
    info: dict[str, Any] = await call_model(handle.info.remote())
    return ClassifierInfo(labels=tuple(info["labels"]), max_tokens=int(info["max_tokens"]))


async def classifier_token_spans(handle: DeploymentHandle[Any], text: str) -> list[tuple[int, int]]:
    """The [start, end) character span of each token a classifier app sees in `text`."""
    spans: list[list[int]] = await call_model(handle.token_spans.remote(text))
    return [(start, end) for start, end in spans]


@dataclass(frozen=True)
class PromptTokens:
    """A model's context window and the length of each prompt asked about, in its tokens."""

    context_window: int
    counts: list[int]


async def prompt_tokens(handle: DeploymentHandle[Any], prompts: list[str]) -> PromptTokens | None:
    """How long `prompts` are for the model behind `handle`; None when its engine cannot
    count (its `check` still refuses a prompt that does not fit)."""
    found: dict[str, Any] | None = await call_model(handle.prompt_tokens.remote(prompts))
    if found is None:
        return None
    return PromptTokens(
        context_window=int(found["context_window"]), counts=[int(n) for n in found["counts"]]
    )
