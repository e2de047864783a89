"""Load benchmark: chat completion against a real Corral at a fixed concurrency, then past
the model's queue bound.

    python bench/load.py [--duration 120] [--concurrency 4] [--max-tokens 128]
                         [--queue-bound 4] [--max-batch-size 4]
                         [--overload-duration 15] [--overload-concurrency N]
                         [--home DIR] [--quick]

It builds the demo model, writes a models file that serves it on one replica with a
small queue bound (`max_queued_requests`), and starts `corral serve` as a child process
on an embedded home (its own Ray head, SQLite), as the demo does. Then two phases, each
a closed loop of `concurrency` clients that send the next request as soon as the last
one is answered:

1. load: `--concurrency` clients (within the bound) for `--duration` seconds; prints
   requests, failures, p50/p95/p99 latency and throughput.
2. overload: more clients than one replica runs plus its queue holds. Requests past
   the bound must be refused at once with 503 (or 429) and `Retry-After`; the client
   waits that long before its next request, as a well-behaved client would. Prints how
   many were refused, how many refusals carried `Retry-After`, and the refusal latency.

The last line is `RESULT {json}` with every figure, for tests/bench/test_load.py.

The clients are a bounded asyncio loop over httpx (already a dependency) rather than
locust: a closed loop at fixed concurrency with exact percentiles is a few dozen lines,
and locust would bring gevent, Flask and a web UI into the test environment for it.
`--quick` runs a few seconds of each phase, for the test."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from corral.config import Settings
from corral.demo import corral_server, greedy_chat
from corral.demo_model import build_demo_model
from corral.milvus_server import LocalMilvus
from corral.ray_cluster import LocalRayHead

MODEL = "llama3_8b_chat"
PROMPT = "Tell me about rivers."
REFUSED = frozenset({429, 503})
# Settings that would point `corral serve` somewhere other than the bench's own home.
_FOREIGN_ENV = ("CORRAL_DATABASE_URL", "CORRAL_MODELS_FILE", "RAY_ADDRESS", "CORRAL_RAY_ADDRESS")


@dataclass(frozen=True)
class Sample:
    status: int  # 0: no HTTP answer (connection error, timeout)
    latency_s: float
    retry_after: str | None


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_figures(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_s": None, "p95_s": None, "p99_s": None, "max_s": None}
    return {
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "p99_s": percentile(latencies, 99),
        "max_s": max(latencies),
    }


_ONE = httpx.Limits(max_connections=1, max_keepalive_connections=1)


async def drive(
    *,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    concurrency: int,
    duration_s: float,
    timeout_s: float,
) -> tuple[list[Sample], float]:
    """`concurrency` closed-loop clients for `duration_s`; every sample and the elapsed
    time. A refused client waits the `Retry-After` it was given (within the run)."""
    samples: list[Sample] = []
    started = time.perf_counter()
    deadline = started + duration_s

    async def client_loop() -> None:
        # A client (and connection pool) of its own per loop: httpcore's pool looks at
        # every one of its connections for each request, so one pool shared by 64 loops
        # kept this process's CPU busy (py-spy: 93 % in the pool at 64 loops) and the
        # sweep measured the load generator instead of the server.
        async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=_ONE) as client:
            await send_until_deadline(client)

    async def send_until_deadline(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                response = await client.post(url, json=body)
                sample = Sample(
                    response.status_code,
                    time.perf_counter() - sent,
                    response.headers.get("retry-after"),
                )
            except httpx.HTTPError:
                sample = Sample(0, time.perf_counter() - sent, None)
            samples.append(sample)
            if sample.status in REFUSED and sample.retry_after is not None:
                wait = min(_seconds(sample.retry_after), deadline - time.perf_counter())
                if wait > 0:
                    await asyncio.sleep(wait)

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def _seconds(retry_after: str) -> float:
    try:
        return max(0.0, float(retry_after))
    except ValueError:
        return 1.0  # an HTTP date: not what Corral sends; wait a second


def summarize(samples: list[Sample], elapsed_s: float, concurrency: int) -> dict[str, Any]:
    ok = [s.latency_s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status in REFUSED]
    failures = [s for s in samples if s.status != 200 and s.status not in REFUSED]
    return {
        "concurrency": concurrency,
        "elapsed_s": elapsed_s,
        "requests": len(samples),
        "ok": len(ok),
        "failures": len(failures),
        "failure_statuses": sorted({s.status for s in failures}),
        "refused": len(refused),
        "refused_with_retry_after": sum(s.retry_after is not None for s in refused),
        "throughput_rps": len(ok) / elapsed_s if elapsed_s > 0 else 0.0,
        "latency": latency_figures(ok),
        "refusal_latency": latency_figures([s.latency_s for s in refused]),
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


def print_phase(name: str, figures: dict[str, Any]) -> None:
    lat, ref = figures["latency"], figures["refusal_latency"]
    print(
        f"{name}: {figures['elapsed_s']:.1f} s at concurrency {figures['concurrency']}: "
        f"{figures['requests']} requests, {figures['ok']} ok, {figures['failures']} failures"
        f"{' ' + str(figures['failure_statuses']) if figures['failures'] else ''}, "
        f"{figures['refused']} refused ({figures['refused_with_retry_after']} with Retry-After)"
    )
    print(
        f"  throughput {figures['throughput_rps']:.2f} req/s; latency p50 {_ms(lat['p50_s'])}"
        f" p95 {_ms(lat['p95_s'])} p99 {_ms(lat['p99_s'])} max {_ms(lat['max_s'])}"
    )
    if figures["refused"]:
        print(
            f"  refusal latency p50 {_ms(ref['p50_s'])} p95 {_ms(ref['p95_s'])}"
            f" p99 {_ms(ref['p99_s'])} max {_ms(ref['max_s'])}"
        )
    sys.stdout.flush()


def write_models_file(home: Path, *, queue_bound: int, max_batch_size: int) -> Path:
    """The demo model on one replica of one CPU, with the queue bound under test."""
    model_dir = build_demo_model(home / "models" / "demo")
    entry = {
        "name": "demo",
        "aliases": [MODEL],
        "checkpoint_dir": str(model_dir),
        "device": "cpu",
        "cpus_per_replica": 1,
        "min_replicas": 1,
        "max_replicas": 1,
        "max_batch_size": max_batch_size,
        "max_queued_requests": queue_bound,
    }
    path = home / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


@contextlib.contextmanager
def corral_on(
    home: Path, *, queue_bound: int | None, max_batch_size: int = 4, start_timeout_s: float = 180.0
) -> Iterator[tuple[str, str]]:
    """`corral serve` on `home` with the bench's models file (or, for `queue_bound`
    None, its embedded default models): (base URL, API key). The Ray head and Milvus
    Lite server it starts are stopped afterwards (ones already running are kept)."""
    for name in _FOREIGN_ENV:
        os.environ.pop(name, None)
    home.mkdir(parents=True, exist_ok=True)
    if queue_bound is not None:
        models_file = write_models_file(
            home, queue_bound=queue_bound, max_batch_size=max_batch_size
        )
        os.environ["CORRAL_MODELS_FILE"] = str(models_file)
    had_head = LocalRayHead(home).find() is not None
    had_milvus = LocalMilvus(home).running() is not None
    key = secrets.token_urlsafe(16)
    try:
        with corral_server(
            Settings(home=home), api_key=key, start_timeout_s=start_timeout_s
        ) as server:
            yield server.base_url, key
    finally:
        if not had_head:
            LocalRayHead(home).stop()
        if not had_milvus:  # corral serve leaves its Milvus Lite server, as its Ray head
            LocalMilvus(home).stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="load phase, seconds")
    parser.add_argument("--concurrency", type=int, default=4, help="clients in the load phase")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--queue-bound", type=int, default=4, help="max_queued_requests")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--overload-duration", type=float, default=15.0)
    parser.add_argument(
        "--overload-concurrency",
        type=int,
        default=None,
        help="clients past the bound (default: 4 x (max batch size + queue bound))",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="per request, seconds")
    parser.add_argument("--home", type=Path, default=None, help="CORRAL_HOME (default: a temp)")
    parser.add_argument("--quick", action="store_true", help="a few seconds of each phase")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = min(args.duration, 3.0)
        args.overload_duration = min(args.overload_duration, 3.0)
    if args.overload_concurrency is None:
        args.overload_concurrency = 4 * (args.max_batch_size + args.queue_bound)
    if min(args.concurrency, args.overload_concurrency, args.queue_bound) < 1:
        parser.error("concurrency and queue bound must be at least 1")
    return args


async def run(base_url: str, key: str, args: argparse.Namespace) -> dict[str, Any]:
    url = f"{base_url}/inference/chat_completion"
    headers = {"Authorization": f"Bearer {key}"}
    body = greedy_chat(MODEL, PROMPT, max_tokens=args.max_tokens)
    async with httpx.AsyncClient(headers=headers, timeout=args.timeout) as warm:
        (await warm.post(url, json=body)).raise_for_status()  # the replica is up and warm
    bound = args.max_batch_size + args.queue_bound
    print(
        f"model {MODEL}: 1 replica, {args.max_batch_size} requests in flight + "
        f"{args.queue_bound} queued = {bound} accepted at once; max_tokens {args.max_tokens}"
    )
    common = {"url": url, "headers": headers, "body": body, "timeout_s": args.timeout}
    load = summarize(
        *await drive(concurrency=args.concurrency, duration_s=args.duration, **common),
        args.concurrency,
    )
    print_phase("load", load)
    overload = summarize(
        *await drive(
            concurrency=args.overload_concurrency, duration_s=args.overload_duration, **common
        ),
        args.overload_concurrency,
    )
    print_phase("overload", overload)
    return {
        "model": MODEL,
        "max_tokens": args.max_tokens,
        "queue_bound": args.queue_bound,
        "max_batch_size": args.max_batch_size,
        "load": load,
        "overload": overload,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # A SIGTERM (a timeout, a CI cancel) unwinds like Ctrl-C, so `corral serve` and the
    # Ray head it started are stopped rather than left running.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
    home = args.home or Path(tempfile.mkdtemp(prefix="cl-", dir="/tmp"))  # short: Ray sockets
    print(f"starting corral serve on {home} (log: {home / 'demo-server.log'})", flush=True)
    started = time.perf_counter()
    with corral_on(home, queue_bound=args.queue_bound, max_batch_size=args.max_batch_size) as (
        base_url,
        key,
    ):
        print(f"serving on {base_url} after {time.perf_counter() - started:.1f} s", flush=True)
        result = asyncio.run(run(base_url, key, args))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
