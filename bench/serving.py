"""Serving benchmark: what the API and Serve add on top of the engine, what batching
buys, and how soon the first streamed token arrives. Every figure is measured in this
run against a baseline measured in the same run.

    python -m bench.serving [--requests 32] [--max-tokens 16]
    python -m bench.serving --sweep [--levels 1,2,4,8,16,32,64,128] [--seconds 10]
    python -m bench.serving --engines [--seconds 10] [--adapters 3]

It starts a private Ray cluster, deploys the demo model with the real transformers
engine, and serves the API with uvicorn on a loopback port.

`--sweep` measures `corral serve` itself instead, on its embedded default models (its own
Ray head on a temporary home, as bench/load.py starts it): first the thin-path figure
(the API's p50 at one request in flight against a bare engine call's p50 on the same
demo model, in alternating rounds so that both see the same machine), then closed-loop
clients at each concurrency level: throughput, p50/p99, and refusals (503 with
`Retry-After`, and how fast they came).

`--engines` compares the transformers and vLLM engines side by side, and N adapters on
one vLLM replica against one app per adapter (bench/engines.py says how)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import ray
import torch
import uvicorn
from ray import serve
from ray.serve.handle import DeploymentHandle

from bench.load import MODEL, PROMPT, corral_on, drive, summarize
from corral import ray_cluster
from corral.api.common import Message
from corral.app import create_app
from corral.config import Settings
from corral.demo import greedy_chat
from corral.demo_guards import build_demo_llama_guard, build_demo_prompt_guard, guard_dirs_beside
from corral.demo_model import build_demo_model
from corral.demo_reward import build_demo_reward_model, reward_dir_beside
from corral.llama3 import format_chat
from corral.ray_cluster import LocalRayHead
from corral.serving.catalog import demo_model_dir
from corral.store import migrate
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from serve_apps.engines.transformers_engine import TransformersEngine, TransformersEngineConfig
from serve_apps.llm import build_app

SAMPLING = {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0}


class OneModel:
    def __init__(self, handle: DeploymentHandle[Any]) -> None:
        self.handle = handle

    def handle_for(self, *, tenant: str, model: str, kind: str = "llm") -> DeploymentHandle[Any]:
        return self.handle


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def chat_body(text: str, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "llama3_8b_chat",
        "dialog": {
            "message": {"role": "user", "content": text, "tool_calls": [], "tool_responses": []},
            "message_history": [],
        },
        "sampling_params": SAMPLING,
        "available_tools": [],
        "max_tokens": max_tokens,
        "stream": stream,
        "logprobs": False,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--sweep", action="store_true", help="measure `corral serve` itself")
    parser.add_argument("--levels", default="1,2,4,8,16,32,64,128", help="sweep concurrencies")
    parser.add_argument("--seconds", type=float, default=10.0, help="per sweep level")
    parser.add_argument("--rounds", type=int, default=5, help="thin-path rounds (sweep)")
    parser.add_argument("--home", type=Path, default=None, help="sweep: a CORRAL_HOME to keep")
    parser.add_argument("--engines", action="store_true", help="transformers vs vLLM, adapters")
    parser.add_argument("--adapters", type=int, default=3, help="engines: adapters to serve")
    args = parser.parse_args()
    if args.engines:
        from bench import engines  # imports peft and the vLLM env's checks only when asked

        engines.run(
            seconds=args.seconds,
            adapter_count=args.adapters,
            max_tokens=args.max_tokens,
        )
        return
    if args.sweep:
        levels = [int(level) for level in args.levels.split(",")]
        sweep(
            levels=levels,
            seconds=args.seconds,
            rounds=args.rounds,
            max_tokens=args.max_tokens,
            home=args.home,
        )
        return
    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    model_dir = build_demo_model(work / "model")
    prompt_text = "Tell me about rivers."
    prompt = format_chat(
        [Message(role="user", content=prompt_text, tool_calls=[], tool_responses=[])]
    )
    request = GenerationRequest(prompt=prompt, sampling=SamplingOptions(max_tokens=args.max_tokens))

    # Baseline: the engine called directly, in this process, with the one intra-op thread
    # a replica with num_cpus=1 gets from Ray (OMP_NUM_THREADS=1), so only the path differs.
    torch.set_num_threads(1)
    engine = TransformersEngine(TransformersEngineConfig(model_dir=model_dir))
    engine.generate([request])  # warm-up
    bare = []
    for _ in range(args.requests):
        start = time.perf_counter()
        engine.generate([request])
        bare.append(time.perf_counter() - start)

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))),
    )
    serve.start(proxy_location="Disabled")
    handle = serve.run(
        build_app(
            {
                "name": "bench",
                "model_dir": str(model_dir),
                "cpus_per_replica": 1,
                "max_batch_size": args.requests,
                "max_queued_requests": 4 * args.requests,
            }
        ),
        name="llm-bench",
        route_prefix=None,
    )
    home = work / "home"
    settings = Settings(home=home)
    migrate.upgrade(settings.resolved_database_url)
    app = create_app(settings, model_router=OneModel(handle))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/inference/chat_completion"

    try:
        with httpx.Client(timeout=120) as client:
            client.post(url, json=chat_body(prompt_text, args.max_tokens))  # warm-up
            api = []
            for _ in range(args.requests):
                start = time.perf_counter()
                client.post(url, json=chat_body(prompt_text, args.max_tokens)).raise_for_status()
                api.append(time.perf_counter() - start)

            first_chunk = []
            for _ in range(min(args.requests, 16)):
                start = time.perf_counter()
                with client.stream(
                    "POST", url, json=chat_body(prompt_text, args.max_tokens, True)
                ) as r:
                    lines = r.iter_lines()
                    for line in lines:
                        if line.startswith("data: "):
                            first_chunk.append(time.perf_counter() - start)
                            break
                    for _ in lines:  # drain the rest of the stream
                        pass

            sequential_start = time.perf_counter()
            for _ in range(args.requests):
                client.post(url, json=chat_body(prompt_text, args.max_tokens)).raise_for_status()
            sequential_s = time.perf_counter() - sequential_start

        with httpx.Client(timeout=120) as client, ThreadPoolExecutor(args.requests) as pool:
            concurrent_start = time.perf_counter()
            responses = list(
                pool.map(
                    lambda _: client.post(url, json=chat_body(prompt_text, args.max_tokens)),
                    range(args.requests),
                )
            )
            concurrent_s = time.perf_counter() - concurrent_start
        assert all(r.status_code == 200 for r in responses)
        largest_step = handle.stats.remote().result()["largest_step"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"engine: demo model, {args.max_tokens} new tokens, greedy; {args.requests} requests "
        "(the replica batches continuously: no batch wait)"
    )
    print(f"bare engine call        p50 {p50(bare) * 1000:8.1f} ms")
    print(
        f"API -> Serve -> engine  p50 {p50(api) * 1000:8.1f} ms   overhead "
        f"{(p50(api) - p50(bare)) * 1000:.1f} ms, ratio {p50(api) / p50(bare):.2f}x"
    )
    print(
        f"first streamed chunk    p50 {p50(first_chunk) * 1000:8.1f} ms "
        f"({p50(first_chunk) / p50(api):.2f} of a whole reply)"
    )
    print(f"sequential   {args.requests / sequential_s:7.1f} req/s")
    print(
        f"concurrent   {args.requests / concurrent_s:7.1f} req/s   ratio "
        f"{sequential_s / concurrent_s:.2f}x (most rows in one step {largest_step})"
    )


def sweep(
    *, levels: list[int], seconds: float, rounds: int, max_tokens: int, home: Path | None
) -> None:
    """The thin-path figure and the concurrency sweep against `corral serve` (see above).
    A `home` given is kept (its demo models are built once); else a temporary one."""
    work = home or Path(tempfile.mkdtemp(prefix="cs-", dir="/tmp"))  # short: Ray's sockets
    # Built here first, as `corral models create-demo` does: `corral serve` keeps them and
    # starts within its time limit even on a busy machine.
    demo = build_demo_model(demo_model_dir(work))
    build_demo_reward_model(reward_dir_beside(demo), policy_dir=demo)
    llama_guard_dir, prompt_guard_dir = guard_dirs_beside(demo)
    build_demo_llama_guard(llama_guard_dir)
    build_demo_prompt_guard(prompt_guard_dir)
    print(f"starting corral serve on {work} (embedded defaults)", flush=True)
    # The Ray head and five apps start on a shared 2-core machine: allow for it (corral
    # serve gives its head 60 s; it uses this one).
    head = LocalRayHead(work)
    own_head = head.find() is None
    head.ensure(timeout_s=600)
    try:
        with corral_on(work, queue_bound=None, start_timeout_s=900) as (base_url, key):
            asyncio.run(_sweep(work, base_url, key, levels, seconds, rounds, max_tokens))
    finally:
        ray.shutdown()
        if own_head:
            head.stop()
        if home is None:
            shutil.rmtree(work, ignore_errors=True)


async def _sweep(
    home: Path,
    base_url: str,
    key: str,
    levels: list[int],
    seconds: float,
    rounds: int,
    max_tokens: int,
) -> None:
    url = f"{base_url}/inference/chat_completion"
    headers = {"Authorization": f"Bearer {key}"}
    body = greedy_chat(MODEL, PROMPT, max_tokens=max_tokens)
    # The bare engine runs in a Ray worker of the same cluster, as a replica's does:
    # Ray runs its workers at niceness 15 with one intra-op thread, and on a shared
    # machine a process at niceness 0 would get far more of the CPU than any replica.
    ray_cluster.connect(address=None, home=home)
    bare_engine: Any = ray.remote(num_cpus=0.25)(BareEngine).remote(
        str(demo_model_dir(home)), max_tokens
    )
    bare: list[float] = []
    api: list[float] = []
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        for _ in range(3):  # warm-up: every replica of the model has answered
            (await client.post(url, json=body)).raise_for_status()
        for _ in range(rounds):
            bare.extend(await bare_engine.time_calls.remote(10))
            for _ in range(10):
                start = time.perf_counter()
                (await client.post(url, json=body)).raise_for_status()
                api.append(time.perf_counter() - start)
    print(
        f"thin path ({max_tokens} tokens, greedy, {len(api)} calls each, load "
        f"{os.getloadavg()[0]:.1f}): bare engine p50 {p50(bare) * 1000:.1f} ms, "
        f"API -> Serve p50 {p50(api) * 1000:.1f} ms: overhead "
        f"{(p50(api) - p50(bare)) * 1000:.1f} ms, ratio {p50(api) / p50(bare):.2f}x",
        flush=True,
    )
    print(" clients   req/s     p50 ms    p99 ms   ok  refused (p99 ms)  failed  load")
    for concurrency in levels:
        samples, elapsed = await drive(
            url=url,
            headers=headers,
            body=body,
            concurrency=concurrency,
            duration_s=seconds,
            timeout_s=120,
        )
        figures = summarize(samples, elapsed, concurrency)
        latency, refusals = figures["latency"], figures["refusal_latency"]
        print(
            f"{concurrency:8d} {figures['throughput_rps']:7.1f} {_ms(latency['p50_s'])} "
            f"{_ms(latency['p99_s'])} {figures['ok']:5d} {figures['refused']:5d} "
            f"({_ms(refusals['p99_s'])}) {figures['failures']:5d} {os.getloadavg()[0]:5.1f}",
            flush=True,
        )
        await asyncio.sleep(1.0)  # the last level's stragglers drain


class BareEngine:
    """The demo model's engine alone, timing its own calls (no RPC in the figure)."""

    def __init__(self, model_dir: str, max_tokens: int) -> None:
        prompt = format_chat(
            [Message(role="user", content=PROMPT, tool_calls=[], tool_responses=[])]
        )
        self._request = GenerationRequest(
            prompt=prompt, sampling=SamplingOptions(max_tokens=max_tokens)
        )
        self._engine = TransformersEngine(TransformersEngineConfig(model_dir=Path(model_dir)))
        self._engine.generate([self._request])  # warm-up

    def time_calls(self, count: int) -> list[float]:
        seconds = []
        for _ in range(count):
            start = time.perf_counter()
            self._engine.generate([self._request])
            seconds.append(time.perf_counter() - start)
        return seconds


def _ms(seconds: float | None) -> str:
    return "     n/a" if seconds is None else f"{seconds * 1000:9.1f}"


if __name__ == "__main__":
    main()
