"""call_each: how many of a request's model calls are in flight at once, their order, and
what one failure does to the rest (the calls through real Serve apps are tested in
tests/api: a batch larger than a model's queue bound is answered)."""

from __future__ import annotations

import asyncio

import pytest

from corral.errors import InvalidRequest
from corral.services.model_calls import (
    CALLS_IN_FLIGHT,
    MAX_BATCH_ITEMS,
    call_each,
    check_batch_size,
)


class Calls:
    """Coroutine factories that record how many run at once and which were cancelled."""

    def __init__(self) -> None:
        self.running = 0
        self.most_at_once = 0
        self.started: list[int] = []
        self.cancelled: list[int] = []
        self.release = asyncio.Event()

    async def call(self, index: int, *, fail: bool = False) -> int:
        self.started.append(index)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if fail:
                raise InvalidRequest(f"call {index} is refused")
            await self.release.wait()
            return index * 10
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        finally:
            self.running -= 1


def test_results_come_in_order_with_at_most_the_bound_in_flight() -> None:
    async def run() -> tuple[list[int], Calls]:
        calls = Calls()
        count = 3 * CALLS_IN_FLIGHT + 5
        task = asyncio.ensure_future(
            call_each([lambda i=i: calls.call(i) for i in range(count)])  # type: ignore[misc]
        )
        while calls.running < CALLS_IN_FLIGHT:
            await asyncio.sleep(0)
        for _ in range(10):  # nothing more starts while the first ones are held
            await asyncio.sleep(0)
        assert calls.running == CALLS_IN_FLIGHT
        calls.release.set()
        return await task, calls

    results, calls = asyncio.run(run())
    assert results == [i * 10 for i in range(3 * CALLS_IN_FLIGHT + 5)]
    assert calls.most_at_once == CALLS_IN_FLIGHT


def test_the_first_failure_fails_the_whole_and_cancels_the_rest() -> None:
    async def run() -> Calls:
        calls = Calls()
        factories = [lambda i=i: calls.call(i) for i in range(CALLS_IN_FLIGHT + 10)]
        factories[3] = lambda: calls.call(3, fail=True)
        with pytest.raises(InvalidRequest, match="call 3 is refused"):
            await call_each(factories)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return calls

    calls = asyncio.run(run())
    # Every held call that had started was cancelled (the first CALLS_IN_FLIGHT at
    # least); most of those waiting for a slot never started.
    assert sorted(calls.cancelled) == sorted(set(calls.started) - {3})
    assert set(range(CALLS_IN_FLIGHT)) - {3} <= set(calls.cancelled)
    assert len(calls.started) < CALLS_IN_FLIGHT + 10
    assert calls.running == 0


def test_a_batch_over_the_cap_is_refused_and_one_at_it_is_not() -> None:
    check_batch_size(MAX_BATCH_ITEMS, "prompts")
    with pytest.raises(InvalidRequest, match=f"at most {MAX_BATCH_ITEMS} prompts"):
        check_batch_size(MAX_BATCH_ITEMS + 1, "prompts")
