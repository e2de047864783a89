"""Synthetic data benchmark: what pipelining the stages buys. Both figures are measured
in this run, on the same models, prompts and batch sizes:

- pipeline: `run_pipeline`, Ray Data streaming generate -> score -> filter, each stage
  an actor working on its batches while the next stage works on earlier ones;
- stages one after the other: the same stage code (the same classes, the same in-flight
  bound) called from this process, every batch through generate, then every batch
  through score, then every batch through filter.

    python bench/synthetic_data.py [--prompts 32] [--candidates 4] [--batch-size 4]

It starts a private Ray cluster and deploys the demo model on the real transformers
engine, and a tiny reward model (the tests' `LlamaForSequenceClassification` on the demo
tokenizer) on the real reward app. The anchor is Ray Data LLM's ~2x over a synchronous
engine; on a 2-core machine the stages share the CPUs, so the ratio is what it is here.
The last line, `RESULT {...}`, carries the figures as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from corral.demo_model import build_demo_model
from corral.demo_reward import build_untrained_reward_model
from jobs.sdg.config import PipelineConfig, PromptInput, PromptTurn, SyntheticDataSettings
from jobs.sdg.pipeline import Filter, Generate, Score, run_pipeline, statistics
from serve_apps.llm import build_app as build_llm_app
from serve_apps.reward import build_app as build_reward_app

TOPICS = ("rivers", "mountains", "bread", "trains", "bees", "glass", "maps", "tea")


def prompts(count: int) -> list[PromptInput]:
    made = []
    for index in range(count):
        text = f"Tell me about {TOPICS[index % len(TOPICS)]}."
        made.append(
            PromptInput(
                index=index,
                generation_prompt=(
                    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                    f"{text}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                ),
                messages=(PromptTurn(role="user", content=text),),
            )
        )
    return made


def pipelined(items: list[PromptInput], config: PipelineConfig) -> dict[str, Any]:
    start = time.perf_counter()
    run = run_pipeline(items, config)
    first = None
    outcomes = []
    for batch in run.batches():
        first = first if first is not None else time.perf_counter() - start
        outcomes.extend(batch)
    wall = time.perf_counter() - start
    figures = statistics(outcomes, run.stage_seconds, wall_s=wall)
    return {"wall_s": wall, "first_batch_s": first, "statistics": figures}


def one_after_the_other(items: list[PromptInput], config: PipelineConfig) -> dict[str, Any]:
    """The same stages over the same batches, each stage finishing every batch first."""
    size = config.batch_size
    batches: list[dict[str, Any]] = [
        {
            "index": np.array([p.index for p in items[i : i + size]]),
            "prompt": np.array([p.model_dump_json() for p in items[i : i + size]], dtype=object),
        }
        for i in range(0, len(items), size)
    ]
    config_json = config.model_dump_json()
    start = time.perf_counter()
    seconds = {}
    for name, stage in (("generate", Generate), ("score", Score), ("filter", Filter)):
        stage_start = time.perf_counter()
        udf = stage(config_json)
        batches = [udf(batch) for batch in batches]
        seconds[name] = time.perf_counter() - stage_start
    wall = time.perf_counter() - start
    failures = [f for batch in batches for f in batch["failure"] if f]
    assert not failures, failures
    return {"wall_s": wall, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-in-flight", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a tiny run, for the smoke test")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.candidates, args.batch_size, args.max_tokens = 4, 2, 2, 4
    work = Path(tempfile.mkdtemp(prefix="corral-bench-sdg-"))
    model_dir = build_demo_model(work / "model")
    reward_dir = build_untrained_reward_model(model_dir, work / "reward")
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(Path(tempfile.mkdtemp(prefix="cbs-", dir="/tmp"))),
    )
    try:
        serve.start(proxy_location="Disabled")
        replica = {"cpus_per_replica": 1, "max_batch_size": args.max_in_flight}
        serve.run(
            build_llm_app({"name": "bench", "model_dir": str(model_dir)} | replica),
            name="llm-bench",
            route_prefix=None,
        )
        serve.run(
            build_reward_app({"name": "bench", "model_dir": str(reward_dir)} | replica),
            name="reward-bench",
            route_prefix=None,
        )
        settings = SyntheticDataSettings.model_validate(
            {"generation": {"num_candidates": args.candidates, "max_tokens": args.max_tokens}}
        )
        config = PipelineConfig(
            filtering_function="top_k",
            settings=settings,
            generation_app="llm-bench",
            reward_app="reward-bench",
            batch_size=args.batch_size,
            max_in_flight=args.max_in_flight,
        )
        items = prompts(args.prompts)
        one_after_the_other(items[: args.batch_size], config)  # warm-up: both models
        sequential = one_after_the_other(items, config)
        pipeline = pipelined(items, config)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    n = args.prompts
    sequential["prompts_per_s"] = n / sequential["wall_s"]
    pipeline["prompts_per_s"] = n / pipeline["wall_s"]
    ratio = pipeline["prompts_per_s"] / sequential["prompts_per_s"]
    seconds = pipeline["statistics"]["seconds"]
    print(
        f"{n} prompts x {args.candidates} candidates, {args.max_tokens} new tokens, batch "
        f"{args.batch_size}, at most {args.max_in_flight} in flight per app; demo LLM + tiny "
        "reward model on the transformers engines"
    )
    print(
        f"stages one after the other {sequential['prompts_per_s']:7.2f} prompts/s "
        f"({sequential['wall_s']:.1f} s: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in sequential["seconds"].items())
        + ")"
    )
    print(
        f"pipeline (Ray Data)        {pipeline['prompts_per_s']:7.2f} prompts/s "
        f"({pipeline['wall_s']:.1f} s, first batch after {pipeline['first_batch_s']:.1f} s; "
        f"busy generate {seconds['generate']:.1f} s, score {seconds['score']:.1f} s)"
    )
    print(f"ratio {ratio:.2f}x (pipeline over one after the other; start-up included)")
    result = {"prompts": n, "sequential": sequential, "pipeline": pipeline, "ratio": ratio}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
