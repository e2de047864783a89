"""Training benchmark: the SFT recipe's steady-state step time against a bare peft + torch
loop on the same model and rows, and how long a job takes from `main()` to its first step.
Every figure is measured in this run against a baseline measured in the same run.

    python bench/training.py [--steps 30] [--batch-size 4] [--hidden-size 256] [--layers 4]

Both sides train LoRA on one process: the recipe through Ray Train with one worker (its
own private Ray cluster), the bare loop in this process with as many torch threads as a
one-CPU Ray worker gets. Latency to the first step is measured twice: from the call to
`main()` in this process (the recipe alone), and from submitting the job to the Ray Jobs API
the way the API server does (`RayJobLauncher`: the fixed `python -m jobs.launch` entrypoint
reading its launch config from the job row) to its `step 1` row in the store.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.demo_model import DemoModelSpec, build_demo_model, describe
from corral.ray_jobs import RayJobLauncher, RayJobState
from corral.store import migrate
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStore
from corral.tenancy import job_key
from jobs import sft
from jobs.config import SFTJobConfig
from jobs.training_data import pad_batch, tokenize_rows

LR = 1e-3
RANK, ALPHA = 8, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QA = [
    ("What is the capital of France?", "The capital of France is Paris, on the river Seine."),
    ("How many days are in a week?", "There are seven days in a week, from Monday to Sunday."),
    ("How do I sort a list in Python?", "Use sorted(items) for a new list, or items.sort()."),
    ("Tell me a fun fact.", "Octopuses have three hearts and blue blood, and they can taste."),
    ("Where should I start?", "Start with the first step, and check each result as you go."),
]


BENCH_TENANT = "bench"


def training_rows(count: int) -> list[dict[str, Any]]:
    rows = []
    for index in range(count):
        question, answer = QA[index % len(QA)]
        rows.append(
            {
                "dialog": [
                    {"role": "system", "content": f"You are a careful assistant, number {index}."},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def worker_threads() -> int:
    """torch's intra-op threads in a Ray worker holding one CPU, as a Train worker does."""

    @ray.remote(num_cpus=1)
    def threads() -> int:
        import torch

        return int(torch.get_num_threads())

    return int(ray.get(threads.remote()))


def bare_loop(model_dir: Path, rows: list[dict[str, Any]], batch_size: int) -> list[float]:
    """Seconds per step of the plainest LoRA loop: the same rows, batches and loss."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    dialogs = tokenize_rows(tokenizer, rows, max_seq_len=2048)
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft reads a deprecated property
        model = get_peft_model(
            base,
            LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, task_type="CAUSAL_LM"),
        )
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0
    )
    times = []
    for start in range(0, len(dialogs) - batch_size + 1, batch_size):
        batch = pad_batch(dialogs[start : start + batch_size], pad_id=tokenizer.pad_token_id)
        began = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        times.append(time.perf_counter() - began)
    return times


def bench_config(
    job_uuid: str,
    url: str,
    model_dir: Path,
    rows: list[dict[str, Any]],
    batch_size: int,
    work: Path,
) -> SFTJobConfig:
    return SFTJobConfig(
        job_key=job_key(BENCH_TENANT, job_uuid),
        database_url=url,
        model_dir=model_dir,
        output_dir=work / job_uuid,
        rows=rows,
        validation_rows=rows[:2],
        algorithm="lora",
        adapter=LoraFinetuningConfig(
            lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            apply_lora_to_output=False,
            rank=RANK,
            alpha=ALPHA,
        ),
        optimizer=OptimizerConfig(optimizer_type="adamw", lr=LR, lr_min=LR, weight_decay=0),
        n_epochs=1,
        n_iters=len(rows) // batch_size,
        batch_size=batch_size,
        shuffle=False,
        num_workers=1,
        max_failures=0,
    )


def _create_job(database: Database, job_uuid: str, config: SFTJobConfig) -> None:
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid=job_uuid,
            tenant=BENCH_TENANT,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={},
            launch=config.model_dump(mode="json", exclude={"database_url"}),
        )


def _lines(database: Database, key: str) -> list[tuple[datetime, str]]:
    with database.transaction() as session:
        return [(line.logged_at, line.line) for line in JobStore(session).log_lines(key)]


def recipe(
    model_dir: Path, rows: list[dict[str, Any]], batch_size: int, work: Path, url: str
) -> tuple[datetime, list[tuple[datetime, str]]]:
    """Run the recipe on one Ray Train worker; its start time and its (time, line) logs."""
    database = Database(url)
    config = bench_config("bench", url, model_dir, rows, batch_size, work)
    _create_job(database, "bench", config)
    started = datetime.now(UTC)
    sft.main(config)
    lines = _lines(database, config.job_key)
    database.dispose()
    return started, lines


def submitted(
    model_dir: Path,
    rows: list[dict[str, Any]],
    batch_size: int,
    work: Path,
    url: str,
    jobs_url: str,
) -> tuple[datetime, list[tuple[datetime, str]]]:
    """The same job submitted as the API server submits it; the submit time and its logs."""
    database = Database(url)
    config = bench_config("bench-submitted", url, model_dir, rows, batch_size, work)
    _create_job(database, "bench-submitted", config)
    launcher = RayJobLauncher(jobs_url, database_url=url)
    started = datetime.now(UTC)
    launcher.submit(config.job_key)
    while (info := launcher.info(config.job_key)) is None or not info.state.is_terminal:
        time.sleep(0.5)
    lines = _lines(database, config.job_key)
    database.dispose()
    if info.state is not RayJobState.SUCCEEDED:
        raise RuntimeError(f"the submitted job ended {info.state}: {info.message}\n{lines}")
    return started, lines


def steady(samples: list[float], warmup: int) -> float:
    return statistics.median(samples[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="Steps left out of the median.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    warmup = min(args.warmup, args.steps - 2)
    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    spec = DemoModelSpec(
        hidden_size=args.hidden_size,
        intermediate_size=args.hidden_size * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden_size // 32,
        num_key_value_heads=max(args.hidden_size // 64, 1),
    )
    model_dir = build_demo_model(work / "model", spec=spec)
    model_line = describe(model_dir).replace(f" at {model_dir}", "")
    rows = training_rows(args.steps * args.batch_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lengths = [len(d.input_ids) for d in tokenize_rows(tokenizer, rows, max_seq_len=2048)]
    batch_tokens = [
        sum(lengths[start : start + args.batch_size])
        for start in range(0, len(lengths), args.batch_size)
    ]
    # The bare loop runs before Ray starts, so that Ray's start-up does not slow it down,
    # with the one thread Ray gives a worker that holds one CPU (checked below).
    torch.set_num_threads(1)
    torch.manual_seed(0)
    bare = bare_loop(model_dir, rows, args.batch_size)
    ray_dir = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))  # socket paths must stay short
    url = f"sqlite:///{work / 'corral.db'}"
    migrate.upgrade(url)
    try:
        context = ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            _temp_dir=str(ray_dir),
        )
        threads = worker_threads()
        started, lines = recipe(model_dir, rows, args.batch_size, work, url)
        jobs_url = f"http://{context.dashboard_url}"
        submit_started, submit_lines = submitted(
            model_dir, rows, args.batch_size, work, url, jobs_url
        )
    finally:
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)

    steps = [(at, line.split()) for at, line in lines if line.startswith("step ")]
    if len(steps) != args.steps:
        raise RuntimeError(f"the recipe logged {len(steps)} steps, not {args.steps}:\n{lines}")
    # Log row to log row is a whole step of the recipe, its write to the store included;
    # the tokens it attended to over its tokens/s is the time of its train_step alone.
    between = [(b - a).total_seconds() for (a, _), (b, _) in itertools.pairwise(steps)]
    compute = [
        tokens / float(words[-1]) for tokens, (_, words) in zip(batch_tokens, steps, strict=True)
    ]
    bare_s = steady(bare, warmup)
    whole_s = steady(between, max(warmup - 1, 0))
    compute_s = steady(compute, warmup)

    def since(start: datetime, logged: list[tuple[datetime, str]], prefix: str) -> float:
        at = next(at for at, line in logged if line.startswith(prefix))
        return (at - start).total_seconds()

    print(model_line)
    print(
        f"LoRA r={RANK} on attention and MLP; batch {args.batch_size}; {args.steps} steps, "
        f"median of the last {args.steps - warmup}; torch threads: 1 bare, {threads} in a worker"
    )
    print(f"{'':38}{'step ms':>9}{'ratio':>8}")
    print(f"{'bare peft + torch loop':38}{bare_s * 1000:9.1f}{1:8.2f}")
    print(
        f"{'recipe, train_step (from tokens/s)':38}{compute_s * 1000:9.1f}{compute_s / bare_s:8.2f}"
    )
    print(f"{'recipe, log row to log row':38}{whole_s * 1000:9.1f}{whole_s / bare_s:8.2f}")
    print(f"{'seconds until the row is in the store':38}{'main()':>9}{'submit':>8}")
    for label, prefix in (
        ("job running, trainer starting", "attempt "),
        ("workers up, baseline validated", "epoch 0 validation loss"),
        ("first step logged (step 1)", "step 1 "),
        ("job done", "done after"),
    ):
        direct = since(started, lines, prefix)
        via_jobs = since(submit_started, submit_lines, prefix)
        print(f"  {label:36}{direct:9.1f}{via_jobs:8.1f}")


if __name__ == "__main__":
    main()
