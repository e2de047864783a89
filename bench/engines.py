"""Engines side by side: the transformers engine and the vLLM engine serving the same model
through Ray Serve, then N LoRA adapters on one vLLM replica against one transformers app
per adapter (what Corral deployed for every adapter before vLLM). One run, one machine:

    python -m bench.serving --engines [--seconds 10] [--adapters 3] [--max-tokens 16]

Every figure goes through the deployments' Serve handles (what the API calls), on a
private Ray cluster; the API in front adds what bench/serving.py measures. For each
engine: completions/s and tokens/s at 1, 8 and 32 concurrent closed-loop callers, and
streamed requests' time to first token and inter-token latency (p50/p99) at 1 and 8
streams. The ratios are vLLM over transformers. For the adapters: time until every
adapter answers, CPUs reserved, replica memory (RSS) and completions/s at 8 callers
spread over the adapters.

The model is a demo-architecture model with head_dim 32 (vLLM's CPU attention needs at
least 32; the demo model has 16), untrained: throughput does not depend on what it says,
and greedy decoding runs every request to `--max-tokens` unless it hits an end token.
The adapters are random rank-8 LoRA weights (peft, not initialised to zero). The vLLM
env must exist (scripts/setup-vllm.sh, or CORRAL_VLLM_PYTHON)."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import psutil  # type: ignore[import-untyped]
import ray
import torch
from peft import LoraConfig, get_peft_model
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util.state import list_actors
from transformers import AutoModelForCausalLM

from corral.demo_model import DemoModelSpec, build_demo_model
from serve_apps.engines.protocol import (
    AdapterRef,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
    TokenDelta,
)
from serve_apps.llm import LLMAppConfig, build_app
from serve_apps.vllm_env import vllm_python

# head_dim = hidden 64 / 2 heads = 32.
SPEC = DemoModelSpec(num_attention_heads=2, num_key_value_heads=2, seed=3)
PROMPT = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    "Tell me about the rivers of the high plateau.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
CPUS_PER_REPLICA = 0.5
LEVELS = (1, 8, 32)
STREAM_LEVELS = (1, 8)


@dataclass(frozen=True)
class Load:
    completions_per_s: float
    tokens_per_s: float
    p50_s: float
    p99_s: float


@dataclass(frozen=True)
class Streams:
    ttft_p50_s: float
    ttft_p99_s: float
    itl_p50_s: float
    itl_p99_s: float


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def closed_loop(call: Callable[[int], GenerationResult], concurrency: int, seconds: float) -> Load:
    """`concurrency` callers, each sending its next request when the last one answered,
    for `seconds`; `call(i)` sends the i-th request of the run."""
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    tokens = [0]
    counter = iter(range(10**9))
    lock = threading.Lock()

    def caller() -> None:
        while time.perf_counter() < deadline:
            with lock:
                index = next(counter)
            started = time.perf_counter()
            result = call(index)
            with lock:
                latencies.append(time.perf_counter() - started)
                tokens[0] += len(result.token_ids)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(caller) for _ in range(concurrency)]:
            future.result()
    elapsed = time.perf_counter() - started
    return Load(
        len(latencies) / elapsed,
        tokens[0] / elapsed,
        statistics.median(latencies),
        percentile(latencies, 0.99),
    )


def streamed(
    handle: DeploymentHandle[Any], request: GenerationRequest, concurrency: int
) -> Streams:
    """`concurrency` streams at once, three rounds: first-token times and the gaps between
    the tokens that followed."""
    first: list[float] = []
    gaps: list[float] = []
    lock = threading.Lock()

    def one() -> None:
        started = last = time.perf_counter()
        mine_first, mine_gaps = None, []
        for item in cast(Iterator[Any], handle.options(stream=True).stream.remote(request)):
            if not isinstance(item, TokenDelta):
                continue
            now = time.perf_counter()
            if mine_first is None:
                mine_first = now - started
            else:
                mine_gaps.append(now - last)
            last = now
        with lock:
            if mine_first is not None:
                first.append(mine_first)
            gaps.extend(mine_gaps)

    for _ in range(3):
        with ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(one) for _ in range(concurrency)]:
                future.result()
    return Streams(
        statistics.median(first),
        percentile(first, 0.99),
        statistics.median(gaps),
        percentile(gaps, 0.99),
    )


@contextmanager
def deployed(configs: list[dict[str, Any]]) -> Iterator[tuple[list[DeploymentHandle[Any]], float]]:
    """The apps of `configs`, deployed together; their handles and the seconds until every
    one was RUNNING. Deleted on the way out."""
    names = [LLMAppConfig.model_validate(config).app_name for config in configs]
    started = time.perf_counter()
    handles = [
        serve.run(build_app(config), name=name, route_prefix=None, blocking=False)
        for config, name in zip(configs, names, strict=True)
    ]
    while any(
        serve.status().applications.get(name) is None
        or serve.status().applications[name].status != "RUNNING"
        for name in names
    ):
        time.sleep(0.2)
    try:
        yield handles, time.perf_counter() - started
    finally:
        for name in names:
            serve.delete(name)


def replica_rss_gib() -> float:
    """The resident memory of every live Serve replica of the LLM deployment."""
    total = 0
    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True):
        if actor.class_name.startswith("ServeReplica:") and actor.pid:
            try:
                process = psutil.Process(actor.pid)
                total += process.memory_info().rss
                total += sum(child.memory_info().rss for child in process.children(True))
            except psutil.NoSuchProcess:
                continue
    return total / 2**30


def make_adapters(model_dir: Path, root: Path, count: int) -> list[Path]:
    """`count` random rank-8 LoRA adapters over the model, each saved as peft does."""
    directories = []
    for index in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
        torch.manual_seed(100 + index)
        lora = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,  # random B as well as A: each adapter changes outputs
            task_type="CAUSAL_LM",
        )
        directory = root / f"adapter-{index}"
        get_peft_model(base, lora).save_pretrained(str(directory))
        directories.append(directory)
    return directories


def engine_figures(model_dir: Path, python: Path, seconds: float, max_tokens: int) -> None:
    request = GenerationRequest(prompt=PROMPT, sampling=SamplingOptions(max_tokens=max_tokens))
    results: dict[str, tuple[dict[int, Load], dict[int, Streams]]] = {}
    for engine in ("transformers", "vllm"):
        config: dict[str, Any] = {
            "name": f"bench-{engine}",
            "model_dir": str(model_dir),
            "engine": engine,
            "device": "cpu",
            "cpus_per_replica": CPUS_PER_REPLICA,
            "max_batch_size": 32,
        }
        if engine == "vllm":
            config["vllm_python"] = str(python)
        with deployed([config]) as ((handle,), ready_s):
            handle.generate.remote(request).result()  # warm-up
            loads = {
                level: closed_loop(
                    lambda _: handle.generate.remote(request).result(), level, seconds
                )
                for level in LEVELS
            }
            streams = {level: streamed(handle, request, level) for level in STREAM_LEVELS}
        results[engine] = loads, streams
        print(f"{engine}: RUNNING {ready_s:.1f} s after serve.run", flush=True)
        for level, load in loads.items():
            print(
                f"  {level:>3} callers: {load.completions_per_s:6.1f} completions/s, "
                f"{load.tokens_per_s:7.1f} tokens/s, p50 {load.p50_s * 1000:6.0f} ms, "
                f"p99 {load.p99_s * 1000:6.0f} ms"
            )
        for level, stream in streams.items():
            print(
                f"  {level:>3} streams: time to first token p50 "
                f"{stream.ttft_p50_s * 1000:.0f} ms, p99 {stream.ttft_p99_s * 1000:.0f} ms; "
                f"inter-token p50 {stream.itl_p50_s * 1000:.1f} ms, "
                f"p99 {stream.itl_p99_s * 1000:.1f} ms",
                flush=True,
            )
    (t_loads, t_streams), (v_loads, v_streams) = results["transformers"], results["vllm"]
    print("vLLM / transformers:")
    for level in LEVELS:
        ratio = v_loads[level].tokens_per_s / t_loads[level].tokens_per_s
        print(f"  tokens/s at {level} callers: {ratio:.2f}x")
    for level in STREAM_LEVELS:
        ttft = v_streams[level].ttft_p50_s / t_streams[level].ttft_p50_s
        itl = v_streams[level].itl_p50_s / t_streams[level].itl_p50_s
        print(f"  at {level} streams: time to first token {ttft:.2f}x, inter-token {itl:.2f}x")


def adapter_figures(
    model_dir: Path, python: Path, adapters: list[Path], seconds: float, max_tokens: int
) -> None:
    sampling = SamplingOptions(max_tokens=max_tokens)
    refs = [
        AdapterRef(adapter_id=f"bench-{i}", tenant="bench", path=str(path))
        for i, path in enumerate(adapters)
    ]
    shared: dict[str, Any] = {
        "name": "bench-adapters",
        "model_dir": str(model_dir),
        "engine": "vllm",
        "device": "cpu",
        "vllm_python": str(python),
        "cpus_per_replica": CPUS_PER_REPLICA,
        "max_batch_size": 32,
        "max_adapters": len(adapters),
        "max_adapters_per_tenant": len(adapters),
        "max_adapter_rank": 8,
    }
    rows = []
    with deployed([shared]) as ((handle,), ready_s):
        started = time.perf_counter()
        for ref in refs:  # each adapter's first request loads it into the replica
            handle.generate.remote(
                GenerationRequest(prompt=PROMPT, sampling=sampling, adapter=ref)
            ).result()
        answering_s = ready_s + time.perf_counter() - started
        load = closed_loop(
            lambda i: handle.generate.remote(
                GenerationRequest(prompt=PROMPT, sampling=sampling, adapter=refs[i % len(refs)])
            ).result(),
            8,
            seconds,
        )
        rows.append(("one vLLM replica", answering_s, CPUS_PER_REPLICA, replica_rss_gib(), load))
    per_adapter = [
        {
            "name": f"bench-adapter-{i}",
            "model_dir": str(model_dir),
            "adapter_dir": str(path),
            "device": "cpu",
            "cpus_per_replica": CPUS_PER_REPLICA,
            "max_batch_size": 32,
        }
        for i, path in enumerate(adapters)
    ]
    with deployed(per_adapter) as (handles, ready_s):
        plain = GenerationRequest(prompt=PROMPT, sampling=sampling)
        started = time.perf_counter()
        for each in handles:
            each.generate.remote(plain).result()
        answering_s = ready_s + time.perf_counter() - started
        load = closed_loop(
            lambda i: handles[i % len(handles)].generate.remote(plain).result(), 8, seconds
        )
        cpus = CPUS_PER_REPLICA * len(handles)
        rows.append(("one transformers app each", answering_s, cpus, replica_rss_gib(), load))
    print(f"{len(adapters)} LoRA adapters (rank 8), 8 callers spread over them:")
    for what, answering, cpus, rss, load in rows:
        print(
            f"  {what:<26}: every adapter answering {answering:5.1f} s after deploy, "
            f"{cpus:.1f} CPUs reserved, replicas' RSS {rss:.2f} GiB, "
            f"{load.completions_per_s:.1f} completions/s, p50 {load.p50_s * 1000:.0f} ms"
        )
    (_, one_s, one_cpus, one_rss, one_load), (_, each_s, each_cpus, each_rss, each_load) = rows
    print(
        f"  one replica / one app each: reserved CPUs {one_cpus / each_cpus:.2f}x, "
        f"RSS {one_rss / each_rss:.2f}x, completions/s "
        f"{one_load.completions_per_s / each_load.completions_per_s:.2f}x, "
        f"time to answering {one_s / each_s:.2f}x"
    )


def run(*, seconds: float, adapter_count: int, max_tokens: int) -> None:
    configured = os.environ.get("CORRAL_VLLM_PYTHON")
    python = vllm_python(Path(configured) if configured else None)
    work = Path(tempfile.mkdtemp(prefix="corral-engines-"))
    model_dir = build_demo_model(work / "model", spec=SPEC)
    adapters = make_adapters(model_dir, work, adapter_count)
    ray.init(address="local", include_dashboard=True, _temp_dir=str(work / "ray"))
    try:
        serve.start()
        engine_figures(model_dir, python, seconds, max_tokens)
        adapter_figures(model_dir, python, adapters, seconds, max_tokens)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
