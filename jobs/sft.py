"""Supervised fine-tuning recipe: full, LoRA or DoRA on Ray Train (DDP over gloo or NCCL).

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

A checkpoint is saved at the end of every epoch in Hugging Face format (a peft adapter for
LoRA/DoRA, full weights for `full`, the tokenizer with both) plus `trainer_state.pt`
(optimizer, schedule, progress), and reported to Ray Train, so a restarted worker group
resumes from it; a new attempt of the job resumes from the last checkpoint row.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Literal, Self

import ray.train
import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, get_device, prepare_model
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from corral.api.post_training import AlgorithmConfig, OptimizerConfig
from corral.store.db import Database
from corral.store.jobs import JobStore
from corral.store.tables import Job
from jobs.reporting import JobReporter
from jobs.training_data import TokenizedDialog, pad_batch, tokenize_rows

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
QLORA_MISSING = (
    "qlora (a 4-bit NF4 base through bitsandbytes) is not wired into this recipe yet; "
    "use lora or dora"
)
# The spec (after torchtune) names the attention output projection `output_proj`.
_ATTENTION_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj"}
_ATTENTION_MODULES |= {"o_proj": "o_proj", "output_proj": "o_proj"}
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


class SFTJobConfig(BaseModel):
    """Everything one SFT run needs; the API side resolves datasets into rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_uuid: str
    database_url: str
    model_dir: Path
    output_dir: Path
    rows: list[dict[str, Any]]
    validation_rows: list[dict[str, Any]]
    algorithm: Literal["full", "lora", "qlora", "dora"]
    adapter: AlgorithmConfig | None = None  # required for lora, qlora and dora
    optimizer: OptimizerConfig
    n_epochs: int = Field(ge=1)
    n_iters: int = Field(ge=1, description="Most optimizer steps per epoch.")
    batch_size: int = Field(ge=1, description="Rows per worker per step.")
    shuffle: bool = True
    seed: int = 0
    max_seq_len: int = Field(default=2048, ge=8)
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(default=2, ge=0, description="Worker group restarts.")

    @model_validator(mode="after")
    def _adapter_follows_algorithm(self) -> Self:
        if self.algorithm != "full" and self.adapter is None:
            raise ValueError(f"algorithm {self.algorithm!r} needs adapter settings")
        if not self.rows:
            raise ValueError("no training rows")
        return self


# ---------------------------------------------------------------- driver


def main(config: SFTJobConfig) -> None:
    """Run one attempt of the job and record its outcome in the store."""
    database = Database(config.database_url)
    reporter = JobReporter(database, config.job_uuid)
    try:
        attempt, resume_from = _attempt_and_last_checkpoint(database, config.job_uuid)
        if config.algorithm == "qlora":
            # Refused before any worker starts: the job fails at once, with the reason.
            error = NotImplementedError(QLORA_MISSING)
            reporter.failed(str(error))
            raise error
        resources = {"num_workers": config.num_workers, "use_gpu": config.use_gpu}
        started = reporter.started(resources_allocated=resources)
        if not started.applied:
            log.warning("job %s is %s; not training", config.job_uuid, started.status)
            return
        reporter.log(
            f"attempt {attempt}: {config.algorithm} on {config.num_workers} workers"
            + (f", resuming from {resume_from}" if resume_from else "")
        )
        try:
            run(config, attempt=attempt)
        except Exception as exc:
            reporter.failed(str(exc) or type(exc).__name__)
            raise
        completed = reporter.completed()
        if not completed.applied:
            reporter.log(f"training finished but the job is {completed.status}; left as it is")
    finally:
        database.dispose()


def run(config: SFTJobConfig, *, attempt: int) -> None:
    """Fit on Ray Train. The run's name carries the attempt: Train V2 resumes a run whose
    name already exists, so a retried attempt must not reuse the last one's name."""
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu),
        run_config=RunConfig(
            name=f"{config.job_uuid}-attempt-{attempt}",
            storage_path=str(config.output_dir / "ray"),
            failure_config=FailureConfig(max_failures=config.max_failures),
        ),
    )
    trainer.fit()


def _attempt_and_last_checkpoint(database: Database, job_uuid: str) -> tuple[int, str | None]:
    with database.transaction() as session:
        job = session.get(Job, job_uuid)
        if job is None:
            raise LookupError(f"no job {job_uuid!r} in the store")
        checkpoints = JobStore(session).checkpoints(job_uuid)
        return job.attempt, checkpoints[-1].path if checkpoints else None


def _last_checkpoint_path(config: SFTJobConfig) -> str | None:
    database = Database(config.database_url)
    try:
        return _attempt_and_last_checkpoint(database, config.job_uuid)[1]
    finally:
        database.dispose()


# ---------------------------------------------------------------- worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: setup -> train -> cleanup."""
    config: SFTJobConfig = loop_config["config"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    database = Database(config.database_url) if rank == 0 else None
    reporter = JobReporter(database, config.job_uuid) if database is not None else None
    torch.manual_seed(config.seed)

    # setup
    # Every rank resumes from the job's last checkpoint row (a previous attempt's, or this
    # run's before Ray Train restarted the worker group), not from ray.train.get_checkpoint():
    # Ray Train registers a report only when its controller next polls all workers, so a
    # worker killed just after reporting leaves a row that Ray Train never saw, and resuming
    # from Ray Train's older checkpoint would save the same `iters` twice.
    resume_from = _last_checkpoint_path(config)
    resume = Checkpoint.from_directory(resume_from) if resume_from else None
    with resume.as_directory() if resume else nullcontext() as resume_dir:
        tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
        model = build_model(config, Path(resume_dir) if resume_dir else None)
        state = _load_trainer_state(Path(resume_dir)) if resume_dir else None
    train_loader = build_loader(tokenizer, config.rows, config, shuffle=config.shuffle)
    validation_loader = build_loader(tokenizer, config.validation_rows, config, shuffle=False)
    steps_per_epoch = min(len(train_loader), config.n_iters)
    model = prepare_model(model)
    optimizer = build_optimizer(config.optimizer, model)
    scheduler = build_cosine_schedule(
        optimizer, config.optimizer, total_steps=steps_per_epoch * config.n_epochs
    )
    first_epoch, step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        first_epoch, step = state["epochs_done"], state["step"]
    device = get_device()

    # train
    if reporter is not None and resume_from is not None:
        reporter.log(f"resumed at step {step} from {resume_from}")
    if first_epoch == 0:
        baseline = validate(model, validation_loader, device)  # every rank all-reduces
        if reporter is not None:
            reporter.log(f"epoch 0 validation loss {baseline:.4f}")
    for epoch in range(first_epoch, config.n_epochs):
        sampler = train_loader.sampler
        assert isinstance(sampler, DistributedSampler)
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        model.train()
        loss = math.nan
        for batch_index, batch in enumerate(train_loader):
            if batch_index >= steps_per_epoch:
                break
            started = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            loss, tokens = train_step(model, optimizer, batch, device)
            scheduler.step()
            step += 1
            if reporter is not None:
                rate = tokens / (time.perf_counter() - started)
                reporter.log(f"step {step} loss {loss:.4f} lr {lr:.3e} tokens/s {rate:.0f}")
        validation_loss = validate(model, validation_loader, device)
        if reporter is not None:
            reporter.log(f"epoch {epoch + 1} validation loss {validation_loss:.4f}")
        metrics = {"loss": loss, "validation_loss": validation_loss}
        save_checkpoint(
            config,
            model,
            tokenizer,
            optimizer,
            scheduler,
            epochs_done=epoch + 1,
            step=step,
            metrics=metrics,
            reporter=reporter,
        )

    # cleanup
    if reporter is not None and database is not None:
        reporter.log(f"done after {step} steps")
        database.dispose()


# ---------------------------------------------------------------- builders


def build_model(config: SFTJobConfig, resume_dir: Path | None) -> torch.nn.Module:
    """The base model, with a fresh or resumed adapter for lora/dora."""
    if config.algorithm == "qlora":
        raise NotImplementedError(QLORA_MISSING)
    if config.algorithm == "full":
        source = resume_dir if resume_dir is not None else config.model_dir
        return AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(config.model_dir, local_files_only=True)
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


def build_loader(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    config: SFTJobConfig,
    *,
    shuffle: bool,
) -> DataLoader[TokenizedDialog]:
    """This worker's shard of the rows, tokenized and padded into batches."""
    dialogs = tokenize_rows(tokenizer, rows, max_seq_len=config.max_seq_len)
    context = ray.train.get_context()
    sampler: DistributedSampler[TokenizedDialog] = DistributedSampler(
        dialogs,  # type: ignore[arg-type]  # a list serves as a map-style dataset
        num_replicas=context.get_world_size(),
        rank=context.get_world_rank(),
        shuffle=shuffle,
        seed=config.seed,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return DataLoader(
        dialogs,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=partial(pad_batch, pad_id=pad_id),
    )


def build_optimizer(settings: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    parameters = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer_type == "adamw":
        return torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer_type == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(
        parameters, lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay
    )


def build_cosine_schedule(
    optimizer: torch.optim.Optimizer, settings: OptimizerConfig, *, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from `lr` at step 0 to `lr_min` after `total_steps`."""
    floor = settings.lr_min / settings.lr

    def factor(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    device: torch.device,
) -> tuple[float, int]:
    """One optimizer step on this worker's batch; returns the loss over all workers' tokens
    and the number of tokens all workers attended to."""
    loss_sum, count = token_loss_sum(model, batch, device)
    loss = loss_sum / count.clamp(min=1)
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)  # DDP averages gradients over workers
    optimizer.step()
    totals = _all_reduce(
        [loss_sum.detach().item(), count.item(), batch["attention_mask"].sum().item()], device
    )
    return totals[0] / max(totals[1], 1.0), int(totals[2])


@torch.no_grad()
def validate(
    model: torch.nn.Module, loader: DataLoader[TokenizedDialog], device: torch.device
) -> float:
    """Token-weighted loss over all workers' validation shards (the sampler repeats a row
    or two when they do not divide evenly among workers)."""
    model.eval()
    loss_sum, count = 0.0, 0.0
    for batch in loader:
        batch_sum, batch_count = token_loss_sum(model, batch, device)
        loss_sum += batch_sum.item()
        count += batch_count.item()
    model.train()
    total_sum, total_count = _all_reduce([loss_sum, count], device)
    return total_sum / max(total_count, 1.0)


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return [float(value) for value in tensor.tolist()]


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(
    config: SFTJobConfig,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    *,
    epochs_done: int,
    step: int,
    metrics: dict[str, float],
    reporter: JobReporter | None,
) -> None:
    """Rank 0 writes an HF-format checkpoint and reports it to Ray Train and the store;
    every rank takes part in the report (Ray Train waits for all of them)."""
    report = {**metrics, "epoch": epochs_done, "step": step}
    if reporter is None:
        ray.train.report(report)
        return
    directory = config.output_dir / "checkpoints" / f"iter-{step}"
    directory.mkdir(parents=True, exist_ok=True)
    _unwrap(model).save_pretrained(str(directory))  # an adapter for peft models, else full weights
    tokenizer.save_pretrained(str(directory))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epochs_done": epochs_done,
            "step": step,
        },
        directory / TRAINER_STATE,
    )
    ray.train.report(
        report,
        checkpoint=Checkpoint.from_directory(str(directory)),
        checkpoint_dir_name=directory.name,
    )
    reporter.checkpoint(iters=step, path=str(directory), metrics=metrics)


def _unwrap(model: torch.nn.Module) -> PreTrainedModel | PeftModel:
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    assert isinstance(inner, PreTrainedModel | PeftModel)
    return inner


def _load_trainer_state(directory: Path) -> dict[str, Any] | None:
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state
