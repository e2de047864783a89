"""Direct preference optimization recipe: a policy trained against a frozen reference on
Ray Train, with DDP or DeepSpeed ZeRO (jobs/distributed.py) over gloo or NCCL.

Reads top to bottom like jobs/sft.py: `main(config)` marks the job running, runs a
`TorchTrainer` whose workers each run `train_loop` (setup -> train -> cleanup), and marks
the job completed or failed. Rank 0 writes log lines and checkpoint rows to the SQL store.

The loss. For a prompt x with chosen reply y_w and rejected reply y_l, the log-probabilities
are summed over the reply's tokens only, and each reply's implicit reward is
r = beta * (log pi_theta(y|x) - log pi_ref(y|x)). The spec's `DPOAlignmentConfig` maps on:
- `reward_scale` is beta (> 0): how far the policy may move from the reference.
- `reward_clip` (>= 0) bounds each implicit reward to [-reward_clip, reward_clip] inside the
  loss, so a reply whose log-ratio already moved past reward_clip / beta is pushed no
  further (nor pulled back); 0 turns clipping off. Logged rewards are never clipped.
- `gamma` (>= 0) is a target margin: z = r_w - r_l - gamma.
- `epsilon` (in [0, 0.5)) is label smoothing, the assumed chance that a pair's preference is
  flipped (conservative DPO): loss = -(1 - epsilon) log sigmoid(z) - epsilon log sigmoid(-z).
With epsilon = gamma = reward_clip = 0 this is the DPO paper's (and trl's "sigmoid") loss;
the loss of a batch is the mean over its pairs, and it starts at log 2 (policy = reference).

Mapping of the rest, as in jobs/sft.py: `n_epochs` passes over the rows; `n_iters` the most
optimizer steps per epoch; `batch_size` pairs per worker per step; the learning rate decays
from `lr` to `lr_min` on a cosine over the run; `zero_stage`, `cpu_offload`,
`activation_checkpointing` and `dtype` choose how the policy is trained (jobs/distributed.py).
The reference is always the original `model_dir`, whole and frozen on every worker (ZeRO
shards the policy only), in the precision the policy computes in.

A checkpoint (the policy's full weights and the tokenizer in Hugging Face format, the
optimizer and schedule, and `trainer_state.pt`) is saved after every epoch; a restarted
worker group and a new attempt of the job both resume from the job's last checkpoint row.
`output_dir` must be on storage that every worker sees.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Self

import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812  # torch's own convention
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.train import Checkpoint
from ray.train.torch import get_device
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from corral.api.post_training import DPOAlignmentConfig, OptimizerConfig
from corral.store.db import Database
from jobs.attempts import last_checkpoint_path, run_attempt
from jobs.distributed import (
    TrainingDtype,
    TrainingEngine,
    ZeroStage,
    describe_parallelism,
    prepare_training,
    torch_dtype,
)
from jobs.preference_data import TokenizedPair, pad_pairs, tokenize_pairs
from jobs.reporting import JobReporter
from jobs.rows import preference_row_problem

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"


class DPOJobConfig(BaseModel):
    """Everything one DPO run needs; the API side resolves datasets into rows."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_key: str
    database_url: str
    model_dir: Path  # the policy starts here; the reference is a frozen copy of it
    output_dir: Path
    rows: list[dict[str, Any]]
    validation_rows: list[dict[str, Any]]
    dpo: DPOAlignmentConfig
    optimizer: OptimizerConfig
    n_epochs: int = Field(ge=1)
    n_iters: int = Field(ge=1, description="Most optimizer steps per epoch.")
    batch_size: int = Field(ge=1, description="Preference pairs per worker per step.")
    shuffle: bool = True
    seed: int = 0
    max_seq_len: int = Field(default=2048, ge=8)
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(default=2, ge=0, description="Worker group restarts.")
    zero_stage: ZeroStage | None = Field(default=None, description="None: DDP.")
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    dtype: TrainingDtype = "float32"

    @model_validator(mode="after")
    def _check(self) -> Self:
        check_alignment(self.dpo)
        if not self.rows:
            raise ValueError("no training rows")
        for name, rows in (("rows", self.rows), ("validation_rows", self.validation_rows)):
            for index, row in enumerate(rows):
                if (problem := preference_row_problem(row)) is not None:
                    raise ValueError(f"{name}[{index}]: {problem}")
        if self.cpu_offload and self.zero_stage is None:
            raise ValueError("cpu_offload needs a zero_stage (it offloads DeepSpeed's state)")
        return self


def check_alignment(settings: DPOAlignmentConfig) -> None:
    """Refuse DPO settings the loss cannot use, saying which and why (ValueError)."""
    values = settings.model_dump()
    if not all(math.isfinite(value) for value in values.values()):
        raise ValueError(f"DPO settings must be finite numbers, got {values}")
    if settings.reward_scale <= 0:
        raise ValueError(f"reward_scale (DPO's beta) must be > 0, got {settings.reward_scale}")
    if not 0 <= settings.epsilon < 0.5:
        raise ValueError(
            "epsilon (label smoothing: the chance a preference is flipped) must be in "
            f"[0, 0.5), got {settings.epsilon}"
        )
    if settings.gamma < 0:
        raise ValueError(f"gamma (the target reward margin) must be >= 0, got {settings.gamma}")
    if settings.reward_clip < 0:
        raise ValueError(f"reward_clip must be >= 0 (0 turns it off), got {settings.reward_clip}")


# ---------------------------------------------------------------- the loss


@dataclass(frozen=True)
class PairScores:
    losses: torch.Tensor  # one per pair
    chosen_rewards: torch.Tensor  # beta * log-ratio, unclipped, detached
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    settings: DPOAlignmentConfig,
) -> PairScores:
    """Per-pair DPO losses from per-sequence log-probs (see the module docstring)."""
    chosen_rewards = settings.reward_scale * (policy_chosen - reference_chosen)
    rejected_rewards = settings.reward_scale * (policy_rejected - reference_rejected)
    clipped_chosen, clipped_rejected = chosen_rewards, rejected_rewards
    if settings.reward_clip > 0:
        clipped_chosen = chosen_rewards.clamp(-settings.reward_clip, settings.reward_clip)
        clipped_rejected = rejected_rewards.clamp(-settings.reward_clip, settings.reward_clip)
    z = clipped_chosen - clipped_rejected - settings.gamma
    losses = -(1 - settings.epsilon) * F.logsigmoid(z) - settings.epsilon * F.logsigmoid(-z)
    return PairScores(losses, chosen_rewards.detach(), rejected_rewards.detach())


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p(token | tokens before it) over each sequence's labelled tokens."""
    targets = labels[:, 1:]
    # cross_entropy never holds a second vocabulary-sized tensor, unlike log_softmax + gather.
    token_nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
    )  # ignore_index -100 gives 0 for prompt and padding
    return -token_nll.view(targets.shape).sum(dim=1)


def pair_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and the rejected replies' log-probs from one forward pass over the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = sequence_logps(logits, batch["labels"]).chunk(2)
    return chosen, rejected


# ---------------------------------------------------------------- driver


def main(config: DPOJobConfig) -> None:
    """Run one attempt of the job and record its outcome in the store."""
    dpo = config.dpo

    def describe(attempt: int, resume_from: str | None) -> list[str]:
        return [
            f"attempt {attempt}: dpo on {config.num_workers} workers "
            f"({describe_parallelism(config)}; beta {dpo.reward_scale}, epsilon {dpo.epsilon}, "
            f"gamma {dpo.gamma}, reward_clip {dpo.reward_clip})"
            + (f", resuming from {resume_from}" if resume_from else "")
        ]

    run_attempt(config, train_loop, describe=describe)


# ---------------------------------------------------------------- worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: setup -> train -> cleanup."""
    config: DPOJobConfig = loop_config["config"]
    rank = ray.train.get_context().get_world_rank()
    database = Database(config.database_url) if rank == 0 else None
    reporter = JobReporter(database, config.job_key) if database is not None else None
    torch.manual_seed(config.seed)
    device = get_device()

    # setup
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    train_loader = build_loader(tokenizer, config.rows, config, shuffle=config.shuffle)
    validation_loader = build_loader(tokenizer, config.validation_rows, config, shuffle=False)
    steps_per_epoch = min(len(train_loader), config.n_iters)
    # Every rank resumes from the job's last checkpoint row (see jobs/attempts.py).
    resume_from = last_checkpoint_path(config)
    resume = Checkpoint.from_directory(resume_from) if resume_from else None
    with resume.as_directory() if resume else nullcontext() as resume_dir:
        resume_path = Path(resume_dir) if resume_dir else None
        policy = load_model(resume_path or config.model_dir, torch.float32)
        state = _load_trainer_state(resume_path) if resume_path else None
        engine, reference = prepare_models(
            config, policy, total_steps=steps_per_epoch * config.n_epochs, device=device
        )
        if resume_path is not None and state is not None:
            engine.load_state(resume_path)
    first_epoch, step = (state["epochs_done"], state["step"]) if state else (0, 0)

    # train
    if reporter is not None:
        total = steps_per_epoch * config.n_epochs
        reporter.plan(total_steps=total, detail=f"{config.n_epochs} epochs of {steps_per_epoch}")
    if reporter is not None and resume_from is not None:
        reporter.log(f"resumed at step {step} from {resume_from}")
    if first_epoch == 0:
        baseline = validate(engine, reference, validation_loader, config.dpo, device)
        if reporter is not None and baseline is not None:
            reporter.log(f"epoch 0 validation {baseline.describe()}")
            reporter.metrics(step=step, epoch=0, **baseline.figures("validation_"))
    for epoch in range(first_epoch, config.n_epochs):
        sampler = train_loader.sampler
        assert isinstance(sampler, DistributedSampler)
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        engine.model.train()
        stats: PairStats | None = None
        for batch_index, batch in enumerate(train_loader):
            if batch_index >= steps_per_epoch:
                break
            started = time.perf_counter()
            lr = engine.last_lr()
            stats = train_step(engine, reference, batch, config.dpo, device)
            step += 1
            if reporter is not None:
                rate = stats.tokens / (time.perf_counter() - started)
                reporter.log(
                    f"step {step} loss {stats.loss:.4f} lr {lr:.3e} tokens/s {rate:.0f} "
                    f"reward_accuracy {stats.reward_accuracy:.2f} "
                    f"reward_margin {stats.reward_margin:.4f}"
                )
                reporter.metrics(
                    step=step,
                    epoch=epoch + 1,
                    learning_rate=lr,
                    tokens_per_second=rate,
                    **stats.figures(),
                )
        validation = validate(engine, reference, validation_loader, config.dpo, device)
        metrics = {"loss": stats.loss if stats is not None else math.nan}
        if validation is not None:
            metrics |= {
                "validation_loss": validation.loss,
                "validation_reward_accuracy": validation.reward_accuracy,
                "validation_reward_margin": validation.reward_margin,
            }
            if reporter is not None:
                reporter.log(f"epoch {epoch + 1} validation {validation.describe()}")
                reporter.metrics(step=step, epoch=epoch + 1, **validation.figures("validation_"))
        save_checkpoint(
            config,
            engine,
            tokenizer,
            epochs_done=epoch + 1,
            step=step,
            metrics=metrics,
            reporter=reporter,
        )

    # cleanup
    if reporter is not None and database is not None:
        reporter.log(f"done after {step} steps")
        reporter.close()
        database.dispose()


# ---------------------------------------------------------------- builders


def load_model(directory: Path, dtype: torch.dtype) -> PreTrainedModel:
    """A causal LM in `dtype`, whatever its checkpoint holds (transformers 5 would keep a
    bf16 checkpoint in bf16, and the optimizer must update float32 weights)."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=dtype
    )
    return model


def prepare_models(
    config: DPOJobConfig, policy: PreTrainedModel, *, total_steps: int, device: torch.device
) -> tuple[TrainingEngine, torch.nn.Module]:
    """The policy under the shared training layer (DDP, or DeepSpeed ZeRO when zero_stage is
    set) with its optimizer and schedule, and the frozen reference on this worker's device.
    DeepSpeed's bf16 mode keeps the policy's weights in bf16, so the reference's are too;
    otherwise both compute from float32 weights (under autocast for bf16), and they agree
    exactly before the first step."""
    engine = prepare_training(
        policy, config.optimizer, config, total_steps=total_steps, device=device
    )
    zero_bf16 = config.zero_stage is not None and config.dtype == "bfloat16"
    reference: torch.nn.Module = load_model(
        config.model_dir, torch_dtype(config.dtype) if zero_bf16 else torch.float32
    )
    reference.requires_grad_(False).eval().to(device)
    return engine, reference


def build_loader(
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict[str, Any]],
    config: DPOJobConfig,
    *,
    shuffle: bool,
) -> DataLoader[TokenizedPair]:
    """This worker's shard of the pairs, tokenized and padded into batches."""
    pairs = tokenize_pairs(tokenizer, rows, max_seq_len=config.max_seq_len)
    if rows and not pairs:
        raise ValueError(f"max_seq_len {config.max_seq_len} cuts off every reply")
    context = ray.train.get_context()
    sampler: DistributedSampler[TokenizedPair] = DistributedSampler(
        pairs,  # type: ignore[arg-type]  # a list serves as a map-style dataset
        num_replicas=context.get_world_size(),
        rank=context.get_world_rank(),
        shuffle=shuffle,
        seed=config.seed,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return DataLoader(
        pairs,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        sampler=sampler,
        collate_fn=partial(pad_pairs, pad_id=pad_id),
    )


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class PairStats:
    """A batch's (or a validation pass's) figures over all workers' pairs."""

    loss: float
    reward_accuracy: float  # share of pairs whose chosen reward beats the rejected one
    reward_margin: float  # mean of chosen minus rejected reward
    tokens: int  # tokens the policy attended to
    chosen_reward: float  # mean implicit reward of the chosen replies
    rejected_reward: float

    def figures(self, prefix: str = "") -> dict[str, float]:
        """The figures as metrics (`JobReporter.metrics`), names prefixed with `prefix`."""
        names = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")
        return {prefix + name: getattr(self, name) for name in names}

    def describe(self) -> str:
        return (
            f"loss {self.loss:.4f} reward_accuracy {self.reward_accuracy:.2f} "
            f"reward_margin {self.reward_margin:.4f}"
        )


def _batch_figures(
    scores: PairScores, batch: dict[str, torch.Tensor]
) -> tuple[float, float, float, float, float, float, float]:
    """Sums that add up over workers: loss, correct pairs, margin, pairs, tokens, chosen
    and rejected rewards."""
    margins = scores.chosen_rewards - scores.rejected_rewards
    return (
        scores.losses.detach().sum().item(),
        (margins > 0).sum().item(),
        margins.sum().item(),
        float(margins.numel()),
        batch["attention_mask"].sum().item(),
        scores.chosen_rewards.sum().item(),
        scores.rejected_rewards.sum().item(),
    )


def _stats(totals: list[float]) -> PairStats:
    loss_sum, correct, margin_sum, pairs, tokens, chosen_sum, rejected_sum = totals
    pairs = max(pairs, 1.0)
    return PairStats(
        loss_sum / pairs,
        correct / pairs,
        margin_sum / pairs,
        int(tokens),
        chosen_reward=chosen_sum / pairs,
        rejected_reward=rejected_sum / pairs,
    )


def train_step(
    engine: TrainingEngine,
    reference: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    settings: DPOAlignmentConfig,
    device: torch.device,
) -> PairStats:
    """One optimizer step on this worker's pairs; figures are over all workers' pairs."""
    batch = {name: tensor.to(device) for name, tensor in batch.items()}
    with torch.no_grad(), engine.autocast():
        reference_chosen, reference_rejected = pair_logps(reference, batch)
    with engine.autocast():
        policy_chosen, policy_rejected = pair_logps(engine.model, batch)
    scores = dpo_loss(
        policy_chosen, policy_rejected, reference_chosen, reference_rejected, settings
    )
    engine.backward_step(scores.losses.mean())  # gradients averaged over workers
    return _stats(_all_reduce(list(_batch_figures(scores, batch)), device))


@torch.no_grad()
def validate(
    engine: TrainingEngine,
    reference: torch.nn.Module,
    loader: DataLoader[TokenizedPair],
    settings: DPOAlignmentConfig,
    device: torch.device,
) -> PairStats | None:
    """DPO figures over all workers' validation shards, None without validation rows (the
    sampler repeats a pair or two when they do not divide evenly among workers)."""
    if len(loader.dataset) == 0:  # type: ignore[arg-type]  # a list
        return None
    engine.model.eval()
    totals = [0.0] * 7  # the sums _batch_figures gives
    for batch in loader:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        with engine.autocast():
            policy = pair_logps(engine.model, batch)
            scores = dpo_loss(*policy, *pair_logps(reference, batch), settings)
        totals = [a + b for a, b in zip(totals, _batch_figures(scores, batch), strict=True)]
    engine.model.train()
    return _stats(_all_reduce(totals, device))


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return [float(value) for value in tensor.tolist()]


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(
    config: DPOJobConfig,
    engine: TrainingEngine,
    tokenizer: PreTrainedTokenizerBase,
    *,
    epochs_done: int,
    step: int,
    metrics: dict[str, float],
    reporter: JobReporter | None,
) -> None:
    """Every rank writes its part of the checkpoint (ZeRO gathers the policy's weights and
    writes optimizer shards from all ranks); rank 0 adds the tokenizer and progress, then
    reports it to Ray Train and the store once all ranks are done. Every rank takes part
    in the report (Ray Train waits for all of them)."""
    report = {**metrics, "epoch": epochs_done, "step": step}
    directory = config.output_dir / "checkpoints" / f"iter-{step}"
    directory.mkdir(parents=True, exist_ok=True)
    engine.save_hf(directory)  # the policy's full weights
    engine.save_state(directory)
    if reporter is not None:
        tokenizer.save_pretrained(str(directory))
        torch.save({"epochs_done": epochs_done, "step": step}, directory / TRAINER_STATE)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 reports only a complete directory
    if reporter is None:
        ray.train.report(report)
        return
    ray.train.report(
        report,
        checkpoint=Checkpoint.from_directory(str(directory)),
        checkpoint_dir_name=directory.name,
    )
    reporter.checkpoint(iters=step, path=str(directory), metrics=metrics)


def _load_trainer_state(directory: Path) -> dict[str, Any] | None:
    path = directory / TRAINER_STATE
    if not path.is_file():
        return None
    state: dict[str, Any] = torch.load(path, weights_only=True)
    return state
