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

The config is `jobs.config.DPOJobConfig`, whose validation also refuses settings the loss
cannot use (`check_alignment`). A checkpoint (the policy's full weights and the tokenizer
in Hugging Face format, the optimizer and schedule, and the progress) is saved after every
epoch by jobs/checkpointer.py; a restarted worker group and a new attempt of the job both
resume from the job's last checkpoint row. `output_dir` must be on storage that every
worker sees.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.nn.functional as F  # noqa: N812  # torch's own convention
from ray.train.torch import get_device
from torch.utils.data import DataLoader, DistributedSampler
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from corral.api.post_training import DPOAlignmentConfig
from jobs.attempts import run_attempt
from jobs.checkpointer import Checkpointer, TrainerState, with_local_model
from jobs.config import DPOJobConfig
from jobs.distributed import (
    TrainingEngine,
    all_reduce_sum,
    prepare_training,
    shard_loader,
    torch_dtype,
)
from jobs.phases import StartClock
from jobs.preference_data import TokenizedPair, pad_pairs, tokenize_pairs
from jobs.reporting import JobReporter

log = logging.getLogger(__name__)


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
    run_attempt(config, train_loop, describe=config.attempt_lines)


# ---------------------------------------------------------------- worker


def train_loop(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: setup -> train -> cleanup."""
    config: DPOJobConfig = with_local_model(loop_config["config"])
    rank = ray.train.get_context().get_world_rank()
    reporter = JobReporter.open(config.report_to, config.job_key) if rank == 0 else None
    clock = StartClock(loop_config)
    if reporter is not None:
        reporter.log(clock.worker_group_ready())
    torch.manual_seed(config.seed)
    device = get_device()

    # setup
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir, local_files_only=True)
    train_loader = build_loader(tokenizer, config.rows, config, shuffle=config.shuffle)
    validation_loader = build_loader(tokenizer, config.validation_rows, config, shuffle=False)
    steps_per_epoch = min(len(train_loader), config.n_iters)
    if reporter is not None:
        reporter.log(clock.data_ready(len(config.rows) + len(config.validation_rows)))
    checkpointer = Checkpointer(config, reporter=reporter)
    with checkpointer.resume() as resume:  # the job's last checkpoint, if it has one
        policy = load_model(resume.directory if resume else config.model_dir, torch.float32)
        engine, reference = prepare_models(
            config, policy, total_steps=steps_per_epoch * config.n_epochs, device=device
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
        baseline = validate(engine, reference, validation_loader, config.dpo, device)
        if reporter is not None and baseline is not None:
            reporter.log(f"epoch 0 validation {baseline.describe()}", clock.baseline_done())
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
                line = (
                    f"step {step} loss {stats.loss:.4f} lr {lr:.3e} tokens/s {rate:.0f} "
                    f"reward_accuracy {stats.reward_accuracy:.2f} "
                    f"reward_margin {stats.reward_margin:.4f}"
                )
                # The first step of this worker group also says how long it took to get here.
                first = (clock.first_step(),) if step == resumed.step + 1 else ()
                reporter.log(line, *first)
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
        progress = TrainerState(epochs_done=epoch + 1, step=step)
        checkpointer.save(engine, tokenizer, progress, metrics=metrics)

    # cleanup
    if reporter is not None:
        reporter.log(f"done after {step} steps")
        reporter.close()


# ---------------------------------------------------------------- builders


def load_model(directory: Path | str, dtype: torch.dtype) -> PreTrainedModel:
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
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return shard_loader(
        pairs,
        batch_size=config.batch_size,
        shuffle=shuffle,
        seed=config.seed,
        collate=partial(pad_pairs, pad_id=pad_id),
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
    return _stats(all_reduce_sum(list(_batch_figures(scores, batch)), device))


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
    return _stats(all_reduce_sum(totals, device))
