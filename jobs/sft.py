"""Supervised fine-tuning recipe: full, LoRA, QLoRA or DoRA on Ray Train, with DDP or
DeepSpeed ZeRO (jobs/distributed.py) over gloo or NCCL.

Reads top to bottom: `main(config)` marks the job running, runs a `TorchTrainer` whose
workers each run `train_loop` (setup -> train -> cleanup), and marks the job completed or
failed. Rank 0 writes log lines and checkpoint rows to the SQL store as it goes.

Mapping of the spec's `training_config`:
- `n_epochs`: passes over the training rows.
- `n_iters`: the most optimizer steps per epoch (torchtune's `max_steps_per_epoch`); an
  epoch ends early when it is reached, otherwise after the last batch.
- `batch_size`: per worker; one optimizer step consumes `batch_size * num_workers` rows.
- The learning rate decays from `lr` to `lr_min` on a cosine over all steps of the run.
- `sgd` is plain SGD with momentum 0.9; `adam` and `adamw` use torch's defaults.
- `zero_stage` (the API derives it from `memory_efficient_fsdp_wrap` / `fsdp_cpu_offload`):
  None trains with DDP, 0-3 with DeepSpeed at that ZeRO stage; `cpu_offload` moves the
  optimizer (and on ZeRO-3 the weights) to CPU memory; `activation_checkpointing`
  recomputes activations in backward; `dtype` bfloat16 trains in mixed precision.
- `qlora` is LoRA over a 4-bit NF4 base (bitsandbytes), with DDP or ZeRO 0-2.

The config is `jobs.config.SFTJobConfig` (light, so the API validates submissions with it).
A checkpoint is saved at the end of every epoch by jobs/checkpointer.py: Hugging Face
format (a peft adapter for LoRA/QLoRA/DoRA over the unquantized `model_dir`, full weights
for `full`, the tokenizer with both), the optimizer and schedule, and the progress. A
restarted worker group and a new attempt of the job both resume from the job's last
checkpoint row. `output_dir` must be on storage that every worker sees.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Any

import ray.train
import torch
from ray.train.torch import get_device
from torch.utils.data import DistributedSampler
from transformers import AutoTokenizer

from jobs.attempts import run_attempt
from jobs.checkpointer import Checkpointer, TrainerState, with_local_model
from jobs.config import SFTJobConfig
from jobs.distributed import build_cosine_schedule as build_cosine_schedule
from jobs.distributed import build_optimizer as build_optimizer
from jobs.distributed import prepare_training
from jobs.phases import StartClock
from jobs.reporting import JobReporter
from jobs.sft_steps import build_loader, build_model, train_step, validate

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- driver


def main(config: SFTJobConfig) -> None:
    """Run one attempt of the job and record its outcome in the store."""
    run_attempt(config, train_loop, describe=config.attempt_lines)


# ---------------------------------------------------------------- worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: setup -> train -> cleanup."""
    config: SFTJobConfig = with_local_model(loop_config["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    reporter = JobReporter.open(config.report_to, config.job_key) if rank == 0 else None
    clock = StartClock(loop_config)
    if reporter is not None:
        reporter.log(clock.worker_group_ready())
    torch.manual_seed(config.seed)
    device = get_device()
    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, every step;
    # keep the worker logs readable.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)

    # setup
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    train_loader = build_loader(tokenizer, config.rows, config, shuffle=config.shuffle)
    validation_loader = build_loader(tokenizer, config.validation_rows, config, shuffle=False)
    steps_per_epoch = min(len(train_loader), config.n_iters)
    if reporter is not None:
        reporter.log(clock.data_ready(len(config.rows) + len(config.validation_rows)))
    checkpointer = Checkpointer(config, reporter=reporter)
    with checkpointer.resume() as resume:  # the job's last checkpoint, if it has one
        model = build_model(config, resume.directory if resume else None)
        engine = prepare_training(
            model,
            config.optimizer,
            config,
            total_steps=steps_per_epoch * config.n_epochs,
            device=device,
        )
        resumed = checkpointer.restore(engine, resume)
    if reporter is not None:
        reporter.log(clock.model_ready())
    first_epoch, step = resumed.epochs_done, resumed.step

    # train
    if reporter is not None:
        total = steps_per_epoch * config.n_epochs
        reporter.plan(total_steps=total, detail=f"{config.n_epochs} epochs of {steps_per_epoch}")
    if reporter is not None and resume is not None:
        reporter.log(f"resumed at step {step} from {resume.source}")
    if first_epoch == 0:
        baseline = validate(engine, validation_loader, device)  # every rank all-reduces
        if reporter is not None:
            reporter.log(f"epoch 0 validation loss {baseline:.4f}", clock.baseline_done())
            reporter.metrics(step=step, epoch=0, validation_loss=baseline)
    for epoch in range(first_epoch, config.n_epochs):
        sampler = train_loader.sampler
        assert isinstance(sampler, DistributedSampler)
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        engine.model.train()
        loss = math.nan
        for batch_index, batch in enumerate(train_loader):
            if batch_index >= steps_per_epoch:
                break
            started = time.perf_counter()
            lr = engine.last_lr()
            loss, tokens = train_step(engine.model, engine, batch, device)
            step += 1
            if reporter is not None:
                rate = tokens / (time.perf_counter() - started)
                line = f"step {step} loss {loss:.4f} lr {lr:.3e} tokens/s {rate:.0f}"
                # The first step of this worker group also says how long it took to get here.
                first = (clock.first_step(),) if step == resumed.step + 1 else ()
                reporter.log(line, *first)
                reporter.metrics(
                    step=step,
                    epoch=epoch + 1,
                    loss=loss,
                    learning_rate=lr,
                    tokens_per_second=rate,
                )
        validation_loss = validate(engine, validation_loader, device)
        if reporter is not None:
            reporter.log(f"epoch {epoch + 1} validation loss {validation_loss:.4f}")
            reporter.metrics(step=step, epoch=epoch + 1, validation_loss=validation_loss)
        metrics = {"loss": loss, "validation_loss": validation_loss}
        progress = TrainerState(epochs_done=epoch + 1, step=step)
        checkpointer.save(engine, tokenizer, progress, metrics=metrics)

    # cleanup
    if reporter is not None:
        reporter.log(f"done after {step} steps")
        reporter.close()
