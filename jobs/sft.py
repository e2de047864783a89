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
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from ray.train.torch import get_device
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedTokenizerBase,
)

from corral.store.db import Database
from jobs.attempts import run_attempt
from jobs.checkpointer import Checkpointer, TrainerState, with_local_model
from jobs.config import SFTJobConfig
from jobs.distributed import (
    TrainingEngine,
    all_reduce_sum,
    prepare_training,
    shard_loader,
    torch_dtype,
)
from jobs.distributed import build_cosine_schedule as build_cosine_schedule
from jobs.distributed import build_optimizer as build_optimizer
from jobs.phases import StartClock
from jobs.reporting import JobReporter
from jobs.training_data import TokenizedDialog, pad_batch, tokenize_rows

log = logging.getLogger(__name__)

# The spec (after torchtune) names the attention output projection `output_proj`.
_ATTENTION_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj"}
_ATTENTION_MODULES |= {"o_proj": "o_proj", "output_proj": "o_proj"}
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


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
    database = Database(config.database_url) if rank == 0 else None
    reporter = JobReporter(database, config.job_key) if database is not None else None
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
    if reporter is not None and database is not None:
        reporter.log(f"done after {step} steps")
        reporter.close()
        database.dispose()


# ---------------------------------------------------------------- builders


def build_model(config: SFTJobConfig, resume_dir: Path | None) -> torch.nn.Module:
    """The base model, with a fresh or resumed adapter for lora/qlora/dora. Weights load in
    float32 whatever the checkpoint holds (transformers 5 would keep a bf16 checkpoint in
    bf16): the optimizer updates float32 weights, bf16 is only ever compute precision."""
    if config.algorithm == "full":
        source = resume_dir if resume_dir is not None else config.model_dir
        return AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, dtype=torch.float32
        )
    if config.algorithm == "qlora":
        base = _load_4bit_base(config)
    else:
        base = AutoModelForCausalLM.from_pretrained(
            config.model_dir, local_files_only=True, dtype=torch.float32
        )
    if resume_dir is not None:
        return PeftModel.from_pretrained(base, str(resume_dir), is_trainable=True)
    assert config.adapter is not None  # the config's validator makes sure
    adapter = config.adapter
    targets = {_ATTENTION_MODULES.get(name, name) for name in adapter.lora_attn_modules}
    if adapter.apply_lora_to_mlp:
        targets.update(_MLP_MODULES)
    if adapter.apply_lora_to_output:
        targets.add("lm_head")
    lora = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        target_modules=sorted(targets),
        use_dora=config.algorithm == "dora",
        task_type="CAUSAL_LM",
    )
    peft_model: torch.nn.Module = get_peft_model(base, lora)
    return peft_model


def _load_4bit_base(config: SFTJobConfig) -> torch.nn.Module:
    """QLoRA's frozen base: linear layers quantized to 4-bit NF4 as they load (on the
    current CUDA device, or on the CPU through bitsandbytes' CPU backend), computing in the
    training dtype; the rest (embeddings, norms) stays float32. The adapter trains in float32
    and is saved against the unquantized `model_dir`, so it serves over the original base."""
    quantization = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantize the quantization constants too (QLoRA)
        bnb_4bit_compute_dtype=torch_dtype(config.dtype),
    )
    base = AutoModelForCausalLM.from_pretrained(
        config.model_dir,
        local_files_only=True,
        dtype=torch.float32,
        quantization_config=quantization,
    )
    # Freezes the base and casts what is not quantized to float32. Activation checkpointing
    # is left to prepare_training, the same for every algorithm.
    prepared: torch.nn.Module = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        base, use_gradient_checkpointing=False
    )
    return prepared


def build_loader(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    config: SFTJobConfig,
    *,
    shuffle: bool,
) -> DataLoader[TokenizedDialog]:
    """This worker's shard of the rows, tokenized and padded into batches."""
    dialogs = tokenize_rows(tokenizer, rows, max_seq_len=config.max_seq_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return shard_loader(
        dialogs,
        batch_size=config.batch_size,
        shuffle=shuffle,
        seed=config.seed,
        collate=partial(pad_batch, pad_id=pad_id),
    )


# ---------------------------------------------------------------- steps


def token_loss_sum(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross entropy over the trained (assistant) tokens, and their count."""
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum"
    )
    return loss, (labels != -100).sum()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | TrainingEngine,
    batch: dict[str, torch.Tensor],
    device: torch.device,
) -> tuple[float, int]:
    """One optimizer step on this worker's batch; returns the loss over all workers' tokens
    and the number of tokens all workers attended to. With a plain torch optimizer the
    caller steps its schedule; an engine (jobs/distributed.py) steps its own."""
    precision = (
        nullcontext() if isinstance(optimizer, torch.optim.Optimizer) else optimizer.autocast()
    )
    with precision:
        loss_sum, count = token_loss_sum(model, batch, device)
    loss = loss_sum / count.clamp(min=1)
    if isinstance(optimizer, torch.optim.Optimizer):
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # DDP averages gradients over workers
        optimizer.step()
    else:
        optimizer.backward_step(loss)
    totals = all_reduce_sum(
        [loss_sum.detach().item(), count.item(), batch["attention_mask"].sum().item()], device
    )
    return totals[0] / max(totals[1], 1.0), int(totals[2])


@torch.no_grad()
def validate(
    model: torch.nn.Module | TrainingEngine,
    loader: DataLoader[TokenizedDialog],
    device: torch.device,
) -> float:
    """Token-weighted loss over all workers' validation shards (the sampler repeats a row
    or two when they do not divide evenly among workers)."""
    module = model if isinstance(model, torch.nn.Module) else model.model
    module.eval()
    loss_sum, count = 0.0, 0.0
    for batch in loader:
        with nullcontext() if isinstance(model, torch.nn.Module) else model.autocast():
            batch_sum, batch_count = token_loss_sum(module, batch, device)
        loss_sum += batch_sum.item()
        count += batch_count.item()
    module.train()
    total_sum, total_count = all_reduce_sum([loss_sum, count], device)
    return total_sum / max(total_count, 1.0)
