"""Data-parallel training for the recipes: torch DDP or DeepSpeed ZeRO behind one small API.

A recipe builds its model (a `PreTrainedModel` or a `PeftModel`), then

    engine = prepare_training(model, config.optimizer, config, total_steps=..., device=...)

and from there only talks to the engine: `engine.model(...)` for forward passes (inside
`engine.autocast()`), `engine.backward_step(loss)` once per step, `engine.last_lr()` for
logging, and at a checkpoint `engine.save_hf(directory)` and `engine.save_state(directory)`;
`engine.load_state(directory)` restores the optimizer and schedule on resume (the recipes
leave those three to jobs/checkpointer.py). Every method that touches a directory must be
called on every rank: ZeRO-3 gathers weights from all of them and DeepSpeed writes one
optimizer shard per rank. Directories are assumed to be on storage every worker sees (the
recipes' `output_dir`). `all_reduce_sum` adds a worker's figures to everyone's.

`zero_stage` None means DDP (each worker holds everything; gradients all-reduced). A
number means DeepSpeed with that ZeRO stage: 1 shards the optimizer state, 2 also the
gradients, 3 also the weights. Both honour the same optimizer settings and cosine
schedule (`build_optimizer`, `build_cosine_schedule`), so a run's numbers do not depend on
the backend. bfloat16 is autocast over float32 weights under DDP and DeepSpeed's bf16
mode (bf16 weights, float32 master copy in the optimizer) under ZeRO; fp16 is not offered.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from peft import PeftModel
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedModel

from corral.api.post_training import OptimizerConfig
from jobs.config import TrainingDtype, ZeroStage

OPTIMIZER_STATE = "optimizer.pt"  # DDP: optimizer and schedule, written by rank 0
DEEPSPEED_STATE = "deepspeed"  # ZeRO: DeepSpeed's own checkpoint, one shard per rank
_DEEPSPEED_TAG = "state"

Example = TypeVar("Example")


class ParallelSettings(Protocol):
    """The fields of a job config that decide how training is spread over workers."""

    @property
    def zero_stage(self) -> ZeroStage | None: ...
    @property
    def cpu_offload(self) -> bool: ...
    @property
    def activation_checkpointing(self) -> bool: ...
    @property
    def dtype(self) -> TrainingDtype: ...
    @property
    def batch_size(self) -> int: ...


class TrainingEngine(Protocol):
    """What a recipe's loop needs, whichever backend prepared the model."""

    model: torch.nn.Module  # call this for forward passes; `train()`/`eval()` work on it

    def autocast(self) -> AbstractContextManager[Any]:
        """Wrap forward passes (training and validation) in this."""
        ...

    def backward_step(self, loss: torch.Tensor) -> None:
        """Backward, optimizer step, schedule step, gradients cleared."""
        ...

    def last_lr(self) -> float:
        """The learning rate the next step will use."""
        ...

    def save_hf(self, directory: Path) -> None:
        """Hugging Face format: a peft adapter for peft models, else full weights."""
        ...

    def save_state(self, directory: Path) -> None:
        """Optimizer and schedule, for `load_state`."""
        ...

    def load_state(self, directory: Path) -> None: ...


def torch_dtype(dtype: TrainingDtype) -> torch.dtype:
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def prepare_training(
    model: torch.nn.Module,
    optimizer_settings: OptimizerConfig,
    settings: ParallelSettings,
    *,
    total_steps: int,
    device: torch.device,
) -> TrainingEngine:
    """Wrap `model` (on the CPU or already on `device`) for data-parallel training over the
    initialized process group, with its optimizer and cosine schedule."""
    if settings.activation_checkpointing:
        enable_activation_checkpointing(model)
    if settings.zero_stage is None:
        return _prepare_ddp(model, optimizer_settings, settings, total_steps, device)
    return _prepare_deepspeed(model, optimizer_settings, settings, total_steps, device)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.
    Non-reentrant checkpointing needs no input that requires grad, so it works with frozen
    embeddings (LoRA) and under DDP and ZeRO-3 alike."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    assert isinstance(inner, PreTrainedModel)
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


# ---------------------------------------------------------------- optimizer and schedule


def build_optimizer(settings: OptimizerConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The spec's optimizer over the trainable parameters: `sgd` is plain SGD with momentum
    0.9; `adam` and `adamw` use torch's defaults."""
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


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """After a restore, set the lr of the restored step from this run's schedule rather
    than keep the saved one: the lr is a function of the step, and the saved value was
    computed over the saving run's total steps, which a new attempt may have changed."""
    lrs = [
        base * factor(scheduler.last_epoch)
        for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports


# ---------------------------------------------------------------- the process group


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all workers (on one worker, the values themselves). Every
    rank must call it; float64, so counts of tokens stay exact."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(tensor)
    return [float(value) for value in tensor.tolist()]


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for on one worker)."""
    if _distributed():
        dist.barrier()


def shard_loader(
    examples: Sequence[Example],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    collate: Callable[[list[Example]], dict[str, torch.Tensor]],
) -> DataLoader[Example]:
    """This worker's shard of `examples`, in batches of `batch_size`. The sampler's
    `set_epoch(epoch)` gives every epoch a new shuffle, the same on every rank."""
    sampler: DistributedSampler[Example] = DistributedSampler(
        examples,  # type: ignore[arg-type]  # a list serves as a map-style dataset
        num_replicas=_world_size(),
        rank=_rank(),
        shuffle=shuffle,
        seed=seed,
    )
    return DataLoader(
        examples,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate,
    )


# ---------------------------------------------------------------- DDP


def _prepare_ddp(
    model: torch.nn.Module,
    optimizer_settings: OptimizerConfig,
    settings: ParallelSettings,
    total_steps: int,
    device: torch.device,
) -> DDPEngine:
    model = model.to(device)
    if _world_size() > 1:
        # Frozen weights (a LoRA base, a 4-bit QLoRA base) are loaded from the same files
        # on every rank: DDP need not broadcast them at start nor watch them for gradients.
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        ddp = torch.nn.parallel.DistributedDataParallel
        ddp._set_params_and_buffers_to_ignore_for_model(model, frozen)  # type: ignore[no-untyped-call]
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(optimizer_settings, model)
    scheduler = build_cosine_schedule(optimizer, optimizer_settings, total_steps=total_steps)
    return DDPEngine(model, optimizer, scheduler, torch_dtype(settings.dtype), device)


@dataclass
class DDPEngine:
    """Plain torch: DDP over the process group (or the bare model on one worker)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dtype: torch.dtype
    device: torch.device

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return nullcontext()
        # bf16 compute over float32 weights, which the optimizer updates in full precision.
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)  # DDP averages gradients over workers
        self.optimizer.step()
        self.scheduler.step()

    def last_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_hf(self, directory: Path) -> None:
        if _rank() == 0:
            save_pretrained(unwrap(self.model), directory)

    def save_state(self, directory: Path) -> None:
        if _rank() == 0:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            torch.save(state, directory / OPTIMIZER_STATE)

    def load_state(self, directory: Path) -> None:
        state = torch.load(directory / OPTIMIZER_STATE, weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        follow_schedule(self.scheduler)


def save_pretrained(
    model: PreTrainedModel | PeftModel, directory: Path, state_dict: dict[str, Any] | None = None
) -> None:
    """Full weights, or for a peft model only its adapter: a LoRA on `lm_head` leaves the
    base's embedding layers unchanged, so they are not copied into the adapter (peft would
    by default, a gigabyte for Llama 3 8B, and they are not gathered under ZeRO-3)."""
    if isinstance(model, PeftModel):
        model.save_pretrained(str(directory), state_dict=state_dict, save_embedding_layers=False)
    else:
        model.save_pretrained(str(directory), state_dict=state_dict)


def unwrap(model: torch.nn.Module) -> PreTrainedModel | PeftModel:
    """The Hugging Face model inside a DDP or DeepSpeed wrapper."""
    inner = getattr(model, "module", model)
    assert isinstance(inner, PreTrainedModel | PeftModel)
    return inner


# ---------------------------------------------------------------- DeepSpeed


def deepspeed_config(
    settings: ParallelSettings, *, hidden_size: int | None, use_gpu: bool
) -> dict[str, Any]:
    """The DeepSpeed config for a ZeRO stage. One micro batch per step per worker: the
    recipes' `batch_size` is already per worker and they do not accumulate gradients."""
    assert settings.zero_stage is not None
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.cpu_offload:
        offload = {"device": "cpu", "pin_memory": use_gpu}  # pinning needs CUDA
        zero["offload_optimizer"] = offload
        if settings.zero_stage == 3:
            zero["offload_param"] = offload
    if settings.zero_stage == 3 and hidden_size is not None:
        # Sized to the model as Hugging Face's integration does: small tensors (norms) stay
        # whole on every rank, the rest are gathered a few layers ahead.
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    return {
        "train_micro_batch_size_per_gpu": settings.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": settings.dtype == "bfloat16"},
        # DeepSpeed clips gradients to norm 1.0 unless told otherwise; DDP does not clip,
        # and a run must take the same steps on either backend.
        "gradient_clipping": 0.0,
        # The spec's SGD is not one of DeepSpeed's own optimizers; ours are plain torch.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the recipes log their own steps
    }


def _prepare_deepspeed(
    model: torch.nn.Module,
    optimizer_settings: OptimizerConfig,
    settings: ParallelSettings,
    total_steps: int,
    device: torch.device,
) -> ZeroEngine:
    import deepspeed
    import deepspeed.ops

    # DeepSpeed's CPU backend compiles a shared-memory all-reduce (38-69 s) when it sets up
    # communication, but only its inference path uses it; training goes through gloo.
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Not ray.train.torch.prepare_model: DeepSpeed wraps the model itself, and a DDP
    # wrapper under it breaks ZeRO-3's backward and ZeRO-2's save_pretrained.
    optimizer = _deepspeed_optimizer(optimizer_settings, model, settings)
    scheduler = build_cosine_schedule(optimizer, optimizer_settings, total_steps=total_steps)
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    config = deepspeed_config(settings, hidden_size=hidden_size, use_gpu=device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,  # DeepSpeed steps it with the optimizer and checkpoints it
        config=config,
        dist_init_required=False,  # Ray Train set the process group up
    )
    return ZeroEngine(engine, scheduler, is_peft=isinstance(model, PeftModel))


def _deepspeed_optimizer(
    optimizer_settings: OptimizerConfig, model: torch.nn.Module, settings: ParallelSettings
) -> torch.optim.Optimizer:
    """Torch's optimizer, except Adam(W) with CPU offload: there the optimizer runs on the
    CPU and DeepSpeed's vectorized CPU Adam (compiled on first use) is several times
    faster than torch's. It computes the same update (Adam's L2 or AdamW's decoupled decay)."""
    if not (settings.cpu_offload and optimizer_settings.optimizer_type in ("adam", "adamw")):
        return build_optimizer(optimizer_settings, model)
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer: torch.optim.Optimizer = DeepSpeedCPUAdam(
        [p for p in model.parameters() if p.requires_grad],
        lr=optimizer_settings.lr,
        weight_decay=optimizer_settings.weight_decay,
        adamw_mode=optimizer_settings.optimizer_type == "adamw",
    )
    return optimizer


@dataclass
class ZeroEngine:
    """DeepSpeed's engine with a ZeRO stage; `model` is the DeepSpeed engine itself."""

    model: Any  # deepspeed.DeepSpeedEngine (untyped)
    scheduler: torch.optim.lr_scheduler.LambdaLR
    is_peft: bool

    def autocast(self) -> AbstractContextManager[Any]:
        return nullcontext()  # in bf16 mode DeepSpeed already holds the weights in bf16

    def backward_step(self, loss: torch.Tensor) -> None:
        self.model.backward(loss)  # reduces (ZeRO-2/3: reduce-scatters) gradients
        self.model.step()  # optimizer step, schedule step, gradients cleared

    def last_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save_hf(self, directory: Path) -> None:
        module = self.model.module
        if self.model.zero_optimization_stage() == 3:
            # The weights are sharded: gather them layer by layer onto rank 0 (only the
            # trainable ones for an adapter). Every rank must take part.
            state = self.model._zero3_consolidated_16bit_state_dict(
                exclude_frozen_parameters=self.is_peft
            )
            if _rank() == 0:
                save_pretrained(module, directory, state)
        elif _rank() == 0:
            save_pretrained(module, directory)

    def save_state(self, directory: Path) -> None:
        self.model.save_checkpoint(
            str(directory / DEEPSPEED_STATE),
            tag=_DEEPSPEED_TAG,
            save_latest=False,
            # An adapter's frozen base is the unchanged model_dir; do not copy it.
            exclude_frozen_parameters=self.is_peft,
        )

    def load_state(self, directory: Path) -> None:
        path, _ = self.model.load_checkpoint(
            str(directory / DEEPSPEED_STATE),
            tag=_DEEPSPEED_TAG,
            load_module_strict=not self.is_peft,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {directory}")
        follow_schedule(self.scheduler)
