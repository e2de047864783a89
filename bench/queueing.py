"""Queueing benchmark: where requests wait when every replica is full, measured without
model cost, so that a busy machine changes little (the engine sleeps instead of
computing: one sleep per decode step for the whole batch, as a batched engine spends).

    python bench/queueing.py [--levels 1,8,32,64,128] [--seconds 6] [--step-ms 4]

Two LLM apps of two replicas each (max_batch_size 8), closed-loop clients through Serve
handles, alternating level by level in one run:

- `router`: max_ongoing_requests = max_batch_size, as Corral sized it before: requests
  past 16 wait in Serve's router, which retries a full replica with a back-off growing
  to 0.5 s, so a replica that frees a place sits idle until a retry comes;
- `replica`: Corral's sizing now (`serve_apps.deployment.max_ongoing_requests`): they
  wait in the replica's own queue and join its batch at the next step.

Printed per level: throughput, p50 and p99 latency, and refusals (BackPressureError)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve_apps.engines.protocol import (
    GenerationRequest,
    GenerationResult,
    RowStep,
    SamplingOptions,
    StopReason,
    TokenDelta,
)
from serve_apps.llm import LLMAppConfig, LLMServer, deployment_options

TOKENS = 16


class SleepingBatch:
    """A decode batch whose step sleeps `step_s` for all its rows together."""

    def __init__(self, step_s: float) -> None:
        self._step_s = step_s
        self._tokens: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def join(self, key: int, request: GenerationRequest, *, stream: bool) -> None:
        self._tokens[key] = 0

    def leave(self, key: int) -> None:
        self._tokens.pop(key, None)

    def step(self) -> list[RowStep]:
        time.sleep(self._step_s)
        finished = []
        for key in list(self._tokens):
            self._tokens[key] += 1
            if self._tokens[key] == TOKENS:
                del self._tokens[key]
                result = GenerationResult("", (0,) * TOKENS, StopReason.OUT_OF_TOKENS, 1)
                finished.append(RowStep(key=key, delta=None, result=result))
        return finished


class SleepingEngine:
    """The generation protocol around `SleepingBatch` (the replica only opens batches)."""

    def __init__(self, step_s: float) -> None:
        self._step_s = step_s

    def check(self, request: GenerationRequest) -> None:
        pass

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        raise NotImplementedError("the replica's scheduler opens batches")

    def stream(self, request: GenerationRequest) -> list[TokenDelta | GenerationResult]:
        raise NotImplementedError("the replica's scheduler opens batches")

    def open_batch(self) -> SleepingBatch:
        return SleepingBatch(self._step_s)


def deploy(name: str, *, step_s: float, max_ongoing: int | None) -> DeploymentHandle[Any]:
    config = LLMAppConfig.model_validate(
        {
            "name": name,
            "model_dir": "/unused",
            "cpus_per_replica": 0.25,
            "min_replicas": 2,
            "max_replicas": 2,
        }
    )
    options = deployment_options(config)
    if max_ongoing is not None:
        options["max_ongoing_requests"] = max_ongoing
    deployment = serve.deployment(**options)(LLMServer)
    return serve.run(
        deployment.bind(config, lambda _config: SleepingEngine(step_s)),
        name=config.app_name,
        route_prefix=None,
    )


async def closed_loop(
    handle: DeploymentHandle[Any], clients: int, seconds: float
) -> tuple[float, list[float], int]:
    """Throughput, the latencies of answered requests, and how many were refused."""
    request = GenerationRequest(prompt="x", sampling=SamplingOptions(max_tokens=TOKENS))
    latencies: list[float] = []
    refused = 0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal refused
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                await handle.generate.remote(request)
            except BackPressureError:
                refused += 1
                await asyncio.sleep(1.0)  # as the API's Retry-After asks
                continue
            latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - started), latencies, refused


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sweep(
    handles: dict[str, DeploymentHandle[Any]], levels: list[int], seconds: float
) -> None:
    for handle in handles.values():
        await handle.generate.remote(GenerationRequest(prompt="x"))
    print(" clients" + "".join(f"  {name:>8}: req/s   p50 ms   p99 ms refused" for name in handles))
    for clients in levels:
        line = f"{clients:8d}"
        for handle in handles.values():
            rps, latencies, refused = await closed_loop(handle, clients, seconds)
            line += (
                f"  {'':>8}  {rps:6.1f} {statistics.median(latencies) * 1000:8.1f} "
                f"{_quantile(latencies, 0.99) * 1000:8.1f} {refused:7d}"
            )
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="1,8,32,64,128")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--step-ms", type=float, default=4.0)
    args = parser.parse_args()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="cq-", dir="/tmp"),
    )
    try:
        serve.start(proxy_location="Disabled")
        step_s = args.step_ms / 1000
        handles = {
            "router": deploy("queue-in-router", step_s=step_s, max_ongoing=8),
            "replica": deploy("queue-on-replica", step_s=step_s, max_ongoing=None),
        }
        print(f"2 replicas x max_batch_size 8, {TOKENS} steps of {args.step_ms:g} ms per request")
        asyncio.run(sweep(handles, [int(level) for level in args.levels.split(",")], args.seconds))
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


if __name__ == "__main__":
    main()
