"""The supervised recipe's model and step, apart from Ray: `build_model` (the base with a
fresh or resumed LoRA/QLoRA/DoRA adapter), `build_loader`, `train_step` and `validate`.
jobs/sft.py runs them on Ray Train workers; bench/gpu_check.py runs them on a bare GPU
machine that has torch, transformers, peft and accelerate but no Ray, so nothing here may
import Ray, DeepSpeed or bitsandbytes at module level (jobs/distributed.py imports
DeepSpeed only when a ZeRO stage asks for it; QLoRA needs bitsandbytes when it loads)."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerBase

from jobs.config import SFTJobConfig
from jobs.distributed import TrainingEngine, all_reduce_sum, shard_loader, torch_dtype
from jobs.training_data import TokenizedDialog, pad_batch, tokenize_rows

# The spec (after torchtune) names the attention output projection `output_proj`.
_ATTENTION_MODULES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj"}
_ATTENTION_MODULES |= {"o_proj": "o_proj", "output_proj": "o_proj"}
_MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


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
