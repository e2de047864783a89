"""A replica's generation scheduler: continuous batching for a `GenerationEngine`.

One engine thread runs one `DecodeBatch` at a time. A request that arrives while the
engine is idle starts at once (no batch wait); one that arrives while it decodes joins
the running batch before the next step, up to `max_batch_size` rows, and waits in the
replica's queue (first come, first served) while the batch is full. Unary requests and
streams share the batch; a stream whose caller went away leaves it before the next step.
An engine without its own `DecodeBatch` (the test engines) has its streams stepped side
by side (`StreamedBatch`)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from serve_apps.deployment import BatchStats
from serve_apps.engines.protocol import (
    BatchDecodingEngine,
    DecodeBatch,
    EngineRequestError,
    GenerationEngine,
    GenerationRequest,
    GenerationResult,
    RowStep,
    TokenDelta,
)

log = logging.getLogger(__name__)
_DONE = object()  # the end of a stream's items


@dataclass
class _Work:
    """One request on its way through the engine, and where its items go."""

    key: int
    request: GenerationRequest
    stream: bool
    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def deliver(self, item: object) -> None:
        """Hand `item` to the caller's event loop (called from the engine thread)."""
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)


class StreamedBatch:
    """A `DecodeBatch` for an engine that has none: each row is the engine's own
    `stream`, and a step takes one item from every row. Rows do not share the engine's
    work (each step runs them one after another), but they do share the replica."""

    def __init__(self, engine: GenerationEngine) -> None:
        self._engine = engine
        self._rows: dict[int, tuple[Iterator[TokenDelta | GenerationResult], bool]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def join(self, key: int, request: GenerationRequest, *, stream: bool) -> None:
        self._engine.check(request)
        self._rows[key] = (iter(self._engine.stream(request)), stream)

    def leave(self, key: int) -> None:
        items, _ = self._rows.pop(key, (None, False))
        close = getattr(items, "close", None)
        if close is not None:
            close()  # the engine's own clean-up

    def step(self) -> list[RowStep]:
        outputs = []
        for key, (items, stream) in list(self._rows.items()):
            item = next(items)
            if isinstance(item, GenerationResult):
                self.leave(key)
                outputs.append(RowStep(key=key, delta=None, result=item))
            elif stream:
                outputs.append(RowStep(key=key, delta=item))
        return outputs


def open_batch(engine: GenerationEngine) -> DecodeBatch:
    """The engine's own decode batch, or its streams stepped side by side."""
    if isinstance(engine, BatchDecodingEngine):
        return engine.open_batch()
    return StreamedBatch(engine)


class GenerationScheduler:
    """Feeds a replica's requests to its engine (see the module docstring). The engine
    is only ever driven from the one engine thread, so it needs no lock."""

    def __init__(self, engine: GenerationEngine, *, max_batch_size: int) -> None:
        self._engine = engine
        self._max_rows = max_batch_size
        self._keys = itertools.count()
        self._lock = threading.Lock()  # guards _pending and _running
        self._pending: deque[_Work] = deque()
        self._running = False
        self.batches = BatchStats()  # how many requests joined the engine together
        self.largest_step = 0  # the most rows one decode step ran

    @property
    def waiting(self) -> int:
        """How many requests wait for room in the engine's batch."""
        with self._lock:
            return len(self._pending)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """The request's result, once the engine has run it in whatever batch it joins."""
        work = self._submit(request, stream=False)
        try:
            item = await work.items.get()
        finally:
            work.cancelled.set()  # a no-op once finished; frees the row if the caller left
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, GenerationResult)
        return item

    async def stream(
        self, request: GenerationRequest, cancelled: threading.Event
    ) -> AsyncIterator[TokenDelta | GenerationResult]:
        """A TokenDelta per token, then the result. Setting `cancelled` (or closing this
        iterator) takes the request out of the engine before its next step, and ends
        the iteration."""
        work = self._submit(request, stream=True, cancelled=cancelled)
        try:
            while (item := await work.items.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, TokenDelta | GenerationResult)
                yield item
        finally:
            work.cancelled.set()

    def _submit(
        self, request: GenerationRequest, *, stream: bool, cancelled: threading.Event | None = None
    ) -> _Work:
        work = _Work(next(self._keys), request, stream, asyncio.get_running_loop())
        if cancelled is not None:
            work.cancelled = cancelled
        with self._lock:
            self._pending.append(work)
            start = not self._running
            self._running = True
        if start:
            threading.Thread(target=self._run, name="engine", daemon=True).start()
        return work

    def _take(self, room: int) -> list[_Work] | None:
        """Up to `room` pending requests (callers that left are dropped); None, with the
        engine thread marked stopped, when there is nothing to do."""
        with self._lock:
            taken: list[_Work] = []
            while self._pending and len(taken) < room:
                work = self._pending.popleft()
                if work.cancelled.is_set():
                    work.deliver(_DONE)
                else:
                    taken.append(work)
            if not taken and room == self._max_rows:
                self._running = False
                return None
            return taken

    def _run(self) -> None:
        """The engine thread: until no request is running or waiting, join what has
        arrived, drop what was cancelled, and step."""
        batch = open_batch(self._engine)
        rows: dict[int, _Work] = {}
        try:
            while True:
                joining = self._take(self._max_rows - len(rows))
                if joining is None:
                    return
                for work in joining:
                    try:
                        batch.join(work.key, work.request, stream=work.stream)
                    except EngineRequestError as exc:  # this request alone is refused
                        work.deliver(exc)
                        work.deliver(_DONE)
                        continue
                    rows[work.key] = work
                if joining:
                    self.batches.record(len(joining))
                for key, work in list(rows.items()):
                    if work.cancelled.is_set():
                        batch.leave(key)
                        del rows[key]
                        work.deliver(_DONE)
                if not rows:
                    continue
                self.largest_step = max(self.largest_step, len(rows))
                try:
                    outputs = batch.step()
                except Exception as exc:  # an engine failure fails its whole batch
                    self._fail(rows, exc)
                    batch = open_batch(self._engine)
                    continue
                for output in outputs:
                    work = rows[output.key]
                    if work.stream and output.delta is not None:
                        work.deliver(output.delta)
                    if output.result is not None:
                        work.deliver(output.result)
                        work.deliver(_DONE)
                        del rows[output.key]
        except BaseException as exc:
            # A bug here must not leave callers waiting forever, nor the thread marked
            # as running.
            log.exception("the engine thread failed")
            self._fail(rows, exc)
            with self._lock:
                pending, self._pending = list(self._pending), deque()
                self._running = False
            self._fail({work.key: work for work in pending}, exc)
            raise

    @staticmethod
    def _fail(rows: dict[int, _Work], exc: BaseException) -> None:
        for work in rows.values():
            work.deliver(exc)
            work.deliver(_DONE)
        rows.clear()


def stats(scheduler: GenerationScheduler) -> dict[str, Any]:
    """What `LLMServer.stats` reports for a scheduler."""
    return scheduler.batches.stats() | {
        "largest_step": scheduler.largest_step,
        "waiting": scheduler.waiting,
    }
