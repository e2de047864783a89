"""Serving benchmark: what the API and Serve add on top of the engine, what batching
buys, and how soon the first streamed token arrives. Every figure is measured in this
run against a baseline measured in the same run.

    python bench/serving.py [--requests 32] [--max-tokens 16]

It starts a private Ray cluster, deploys the demo model with the real transformers
engine, and serves the API with uvicorn on a loopback port."""

from __future__ import annotations

import argparse
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

from corral.api.common import Message
from corral.app import create_app
from corral.config import Settings
from corral.demo_model import build_demo_model
from corral.llama3 import format_chat
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
    parser.add_argument("--batch-wait-s", type=float, default=0.01)
    args = parser.parse_args()
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
                "batch_wait_timeout_s": args.batch_wait_s,
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
        sizes = handle.stats.remote().result()["batch_sizes"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"engine: demo model, {args.max_tokens} new tokens, greedy; {args.requests} requests; "
        f"batch wait {args.batch_wait_s * 1000:.0f} ms (part of the API path's latency)"
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
        f"{sequential_s / concurrent_s:.2f}x (largest batch {max(sizes)})"
    )


if __name__ == "__main__":
    main()
