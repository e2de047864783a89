"""The smallest valid fine-tuning request bodies, for API tests that submit jobs without
caring how they train: one step of one row, a rank-4 LoRA on two attention projections."""

from __future__ import annotations

from typing import Any

ONE_STEP = {
    "n_epochs": 1,
    "batch_size": 1,
    "shuffle": False,
    "n_iters": 1,
    "enable_activation_checkpointing": False,
    "memory_efficient_fsdp_wrap": False,
    "fsdp_cpu_offload": False,
}
ADAMW = {"optimizer_type": "adamw", "lr": 1e-3, "lr_min": 1e-4, "weight_decay": 0.0}
SMALL_LORA = {
    "lora_attn_modules": ["q_proj", "v_proj"],
    "apply_lora_to_mlp": False,
    "apply_lora_to_output": False,
    "rank": 4,
    "alpha": 8,
}


def lora_sft_request(
    job_uuid: str,
    dataset: dict[str, Any],
    validation_dataset: dict[str, Any] | None = None,
    *,
    model: str = "llama3_8b",
) -> dict[str, Any]:
    """A one-step LoRA job on `dataset` (validated on `validation_dataset`, or on it)."""
    return {
        "job_uuid": job_uuid,
        "model": model,
        "dataset": dataset,
        "validation_dataset": validation_dataset or dataset,
        "algorithm": "lora",
        "algorithm_config": SMALL_LORA,
        "optimizer_config": ADAMW,
        "training_config": ONE_STEP,
        "hyperparam_search_config": {},
        "logger_config": {},
    }
