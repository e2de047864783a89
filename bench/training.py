"""Training benchmark: the SFT recipe's steady-state step time against a bare peft + torch
loop on the same model and rows, and where a job's start-up goes, from its submission to
its first step, against a no-op Ray Train V2 fit() on the same cluster. Every figure is
measured in this run against a baseline measured in the same run.

    python -m bench.training [--steps 30] [--batch-size 4] [--hidden-size 256] [--layers 4]
    python -m bench.training --startup-only [--repeats 3] [--workers 2]

It starts its own embedded Ray head (Corral's `LocalRayHead`, on free ports under a
temporary CORRAL_HOME, so it runs beside any other cluster on the machine).

Step time: both sides train LoRA on one process: the recipe through Ray Train with one
worker, the bare loop in this process with as many torch threads as a one-CPU Ray worker
gets. Latency to the first step from the call to `main()` in this process (the recipe alone).

Start-up, `--repeats` times side by side: a no-op `TorchTrainer.fit()` (bench/noop_fit.py)
run in this process and submitted as a bare Ray job, then an SFT job submitted the way the
API server submits it (`RayJobLauncher`: the fixed `python -m jobs.launch` entrypoint
reading its launch config from the job row), broken down by the `phase:` lines the job logs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import noop_fit
from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.app import create_app
from corral.config import Settings
from corral.demo_model import DemoModelSpec, build_demo_model, describe
from corral.job_tokens import JobTokens
from corral.ray_cluster import LocalRayHead, RayHead, connect
from corral.ray_jobs import RayJobLauncher, RayJobState
from corral.store import migrate
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStore
from corral.tenancy import job_key
from jobs import sft
from jobs.config import SFTJobConfig
from jobs.report_target import ReportTarget
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
    *,
    num_workers: int = 1,
    n_iters: int | None = None,
) -> SFTJobConfig:
    return SFTJobConfig(
        job_key=job_key(BENCH_TENANT, job_uuid),
        # In process it reports to the store; submitted, the launcher's target wins.
        report_to=ReportTarget(database_url=url),
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
        n_iters=n_iters or len(rows) // batch_size,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        max_failures=0,
    )


def _create_job(database: Database, job_uuid: str, config: SFTJobConfig) -> None:
    with database.transaction() as session:
        JobStore(session).create(
            job_uuid=job_uuid,
            tenant=BENCH_TENANT,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={},
            launch=config.model_dump(mode="json"),
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
    launcher: RayJobLauncher, database: Database, config: SFTJobConfig, job_uuid: str
) -> tuple[float, list[tuple[datetime, str]]]:
    """The job submitted as the API server submits it; the submit time and its logs."""
    _create_job(database, job_uuid, config)
    started = time.time()
    launcher.submit(config.job_key)
    while (info := launcher.info(config.job_key)) is None or not info.state.is_terminal:
        time.sleep(0.5)
    lines = _lines(database, config.job_key)
    if info.state is not RayJobState.SUCCEEDED:
        raise RuntimeError(f"the submitted job ended {info.state}: {info.message}\n{lines}")
    return started, lines


def noop_job(head: RayHead, workers: int, out: Path) -> dict[str, float]:
    """bench/noop_fit.py submitted as a bare Ray job (no runtime_env); its timestamps, and
    `submitted`."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    script = Path(noop_fit.__file__).resolve()
    submitted_at = time.time()
    job_id = client.submit_job(
        entrypoint=f"{sys.executable} {script} --workers {workers} --out {out}"
    )
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.2)
    if str(status) != "SUCCEEDED":
        raise RuntimeError(f"the no-op job ended {status}: {client.get_job_logs(job_id)}")
    times: dict[str, float] = json.loads(out.read_text())
    return times | {"submitted": submitted_at}


# What the phase lines say (jobs/phases.py), in the order a job logs them.
PHASES = (
    ("Ray Jobs: submission -> driver process", r"Ray Jobs started it in ([\d.]+) s"),
    ("driver imports and setup", r"imports and setup ([\d.]+) s"),
    ("  its CPU seconds", r"imports and setup [\d.]+ s, ([\d.]+) s of CPU"),
    ("Train V2 worker group start", r"worker group ready ([\d.]+) s"),
    ("  of which recipe imports (rank 0)", r"recipe imports ([\d.]+) s"),
    ("  their CPU seconds", r"recipe imports [\d.]+ s \(([\d.]+) s of CPU"),
    ("tokenizer and tokenization", r"rows tokenized in ([\d.]+) s"),
    ("model load and prepare", r"prepared for training in ([\d.]+) s"),
    ("baseline validation", r"baseline validated in ([\d.]+) s"),
    ("first step", r"first step took ([\d.]+) s"),
)


def phase_figures(submitted_at: float, lines: list[tuple[datetime, str]]) -> dict[str, float]:
    """Seconds per phase, read from the job's own phase lines, and submit -> step 1 as the
    store saw it (the step's row's timestamp)."""
    figures: dict[str, float] = {}
    for label, pattern in PHASES:
        found = [float(m[1]) for _, line in lines if (m := re.search(pattern, line))]
        if found:
            figures[label] = found[0]
    step_1 = next(at for at, line in lines if line.startswith("step 1 "))
    figures["submit -> first step logged"] = step_1.timestamp() - submitted_at
    return figures


def internal_api(database: Database, home: Path) -> tuple[str, Callable[[], None]]:
    """The API's internal job routes over `database` (what a submitted job reports to),
    served by uvicorn in a thread on a free loopback port: its URL and how to stop it."""
    import socket
    import threading

    import uvicorn

    listener = socket.create_server(("127.0.0.1", 0))
    app = create_app(Settings(home=home), database=database)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()

    return f"http://127.0.0.1:{listener.getsockname()[1]}", stop


def startup(
    head: RayHead,
    model_dir: Path,
    work: Path,
    url: str,
    *,
    workers: int,
    repeats: int,
    extra_env: dict[str, str],
) -> None:
    """The start-up breakdown, the no-op runs and the job's, side by side, `repeats` times."""
    database = Database(url)
    api_url, stop_api = internal_api(database, work / "home")
    launcher = RayJobLauncher(
        head.dashboard_url,
        internal_url=api_url,
        tokens=JobTokens.from_settings(Settings(home=work / "home")),
        extra_env=extra_env,
    )
    rows = training_rows(8 * workers)
    runs: list[dict[str, float]] = []
    # Ray Train's first run on a cluster starts its state actor: a cost of the cluster's
    # first job, not of each job's start, so one unmeasured run goes first.
    noop_fit.run(workers)
    warm = noop_fit.WarmDriver.remote()  # type: ignore[attr-defined]
    ray.get(warm.ready.remote())
    try:
        for repeat in range(repeats):
            called = time.time()
            in_warm_actor = ray.get(warm.run.remote(workers))
            in_process = noop_fit.run(workers)
            as_job = noop_job(head, workers, work / f"noop-{repeat}.json")
            job_uuid = f"bench-start-{repeat}"
            config = bench_config(
                job_uuid, url, model_dir, rows, 1, work, num_workers=workers, n_iters=2
            )
            submitted_at, lines = submitted(launcher, database, config, job_uuid)
            figures = phase_figures(submitted_at, lines)
            figures["no-op fit(), in process: fit -> loop"] = in_process["loop"] - in_process["fit"]
            figures["no-op fit(), in process: whole fit()"] = in_process["done"] - in_process["fit"]
            figures["no-op fit(), warm driver actor: call -> loop"] = in_warm_actor["loop"] - called
            figures["no-op Ray job: submit -> loop"] = as_job["loop"] - as_job["submitted"]
            figures["no-op Ray job: submit -> driver process"] = (
                as_job["process"] - as_job["submitted"]
            )
            runs.append(figures)
    finally:
        stop_api()
        database.dispose()
        ray.kill(warm)
    print(f"start-up, {workers} workers, {repeats} runs side by side (seconds; median, runs)")
    for label in runs[0]:
        values = [run[label] for run in runs if label in run]
        each = " ".join(f"{value:6.2f}" for value in values)
        print(f"  {label:44}{statistics.median(values):7.2f}   [{each}]")
    first_step = statistics.median(run["submit -> first step logged"] for run in runs)
    for floor in (
        "no-op fit(), in process: whole fit()",
        "no-op fit(), warm driver actor: call -> loop",
        "no-op Ray job: submit -> loop",
    ):
        base = statistics.median(run[floor] for run in runs)
        print(
            f"  submit -> first step vs {floor}: {first_step - base:+.2f} s, "
            f"ratio {first_step / base:.2f}"
        )


def steady(samples: list[float], warmup: int) -> float:
    return statistics.median(samples[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="Steps left out of the median.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--startup-only", action="store_true", help="Only the start-up part.")
    parser.add_argument("--repeats", type=int, default=3, help="Start-up runs side by side.")
    parser.add_argument("--workers", type=int, default=2, help="Workers of the start-up runs.")
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
    bare: list[float] = []
    if not args.startup_only:
        # The bare loop runs before Ray starts, so that Ray's start-up does not slow it
        # down, with the one thread Ray gives a worker that holds one CPU (checked below).
        torch.set_num_threads(1)
        torch.manual_seed(0)
        bare = bare_loop(model_dir, rows, args.batch_size)
    url = f"sqlite:///{work / 'corral.db'}"
    migrate.upgrade(url)
    local = LocalRayHead(work / "home")
    try:
        head = connect(address=None, home=local.home)
        assert isinstance(head, RayHead)
        print(model_line)
        startup(
            head,
            model_dir,
            work,
            url,
            workers=args.workers,
            repeats=args.repeats,
            extra_env=local.auth_env(),
        )
        if not args.startup_only:
            threads = worker_threads()
            started, lines = recipe(model_dir, rows, args.batch_size, work, url)
    finally:
        ray.shutdown()
        local.stop()
        shutil.rmtree(local.temp_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if args.startup_only:
        return
    steps_report(args, warmup, rows, model_dir, bare, threads, started, lines)


def steps_report(
    args: argparse.Namespace,
    warmup: int,
    rows: list[dict[str, Any]],
    model_dir: Path,
    bare: list[float],
    threads: int,
    started: datetime,
    lines: list[tuple[datetime, str]],
) -> None:
    """The step-time table: the recipe against the bare loop."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    lengths = [len(d.input_ids) for d in tokenize_rows(tokenizer, rows, max_seq_len=2048)]
    batch_tokens = [
        sum(lengths[start : start + args.batch_size])
        for start in range(0, len(lengths), args.batch_size)
    ]
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
    step_1 = next(at for at, line in lines if line.startswith("step 1 "))
    print(f"{'main() -> step 1 in the store (s)':38}{(step_1 - started).total_seconds():9.1f}")


if __name__ == "__main__":
    main()
