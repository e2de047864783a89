"""jobs.distributed in one process (a gloo group of one): every backend takes the same
optimizer steps as a plain torch loop, exports Hugging Face weights that load back, and
resumes from its saved state exactly; activation checkpointing changes no number; bf16
and a 4-bit QLoRA base train. The 2-worker runs through Ray Train are in test_sft.py."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from corral.api.post_training import OptimizerConfig
from jobs.distributed import (
    DEEPSPEED_STATE,
    OPTIMIZER_STATE,
    TrainingEngine,
    build_cosine_schedule,
    build_optimizer,
    deepspeed_config,
    prepare_training,
)
from jobs.sft_steps import train_step
from tests.conftest import PEFT_DEPRECATION

pytestmark = [
    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates.
    pytest.mark.filterwarnings(r"ignore:`torch\.distributed\.\w+` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings(f"ignore:{PEFT_DEPRECATION}:FutureWarning"),
]

CPU = torch.device("cpu")
STEPS = 4  # two before the checkpoint, two after


class Settings:
    """The parallel fields of a job config, as `prepare_training` reads them."""

    def __init__(
        self,
        zero_stage: int | None = None,
        *,
        cpu_offload: bool = False,
        activation_checkpointing: bool = False,
        dtype: str = "float32",
        batch_size: int = 2,
    ) -> None:
        self.zero_stage = zero_stage
        self.cpu_offload = cpu_offload
        self.activation_checkpointing = activation_checkpointing
        self.dtype = dtype
        self.batch_size = batch_size


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A gloo group of one, as Ray Train would have set up (DeepSpeed reads the env)."""
    store = tmp_path_factory.mktemp("pg") / "store"
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches of two rows (with padding, a masked prompt and a trained reply), each
    seen twice in STEPS steps, so that learning shows as a lower loss the second time."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        input_ids = torch.randint(0, 500, (2, 12), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 9:] = 0
        labels = input_ids.clone()
        labels[:, :4] = -100
        labels[attention_mask == 0] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches * (STEPS // 2)


def _model(model_dir: Path, *, lora: bool, adapter_dir: Path | None = None) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    source = adapter_dir if adapter_dir is not None and not lora else model_dir
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    if not lora:
        return model
    if adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"])
    peft_model: torch.nn.Module = get_peft_model(model, config)
    return peft_model


def _reference_losses(model: torch.nn.Module, settings: OptimizerConfig) -> list[float]:
    """The plain single-process loop the engines must reproduce."""
    optimizer = build_optimizer(settings, model)
    scheduler = build_cosine_schedule(optimizer, settings, total_steps=STEPS)
    losses = []
    for batch in _batches():
        loss, _ = train_step(model, optimizer, batch, CPU)
        scheduler.step()
        losses.append(loss)
    return losses


def _engine_losses(engine: TrainingEngine, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    return [train_step(engine.model, engine, batch, CPU)[0] for batch in batches]


def _cosine_lr(settings: OptimizerConfig, *, step: int) -> float:
    progress = math.pi * step / STEPS
    return settings.lr_min + (settings.lr - settings.lr_min) * 0.5 * (1 + math.cos(progress))


OPTIMIZERS = {
    "adamw": OptimizerConfig(optimizer_type="adamw", lr=3e-3, lr_min=3e-4, weight_decay=0.1),
    "sgd": OptimizerConfig(optimizer_type="sgd", lr=3e-2, lr_min=0.0, weight_decay=0.01),
}


@pytest.mark.parametrize(
    ("zero_stage", "lora", "optimizer"),
    [
        (None, False, "adamw"),
        (0, False, "adamw"),
        (1, True, "sgd"),
        (2, True, "adamw"),
        (3, False, "adamw"),
        (3, True, "sgd"),
    ],
)
def test_engines_match_a_plain_loop_export_and_resume(
    process_group: None,
    demo_model_dir: Path,
    tmp_path: Path,
    zero_stage: int | None,
    lora: bool,
    optimizer: str,
) -> None:
    settings = OPTIMIZERS[optimizer]
    parallel = Settings(zero_stage)
    expected = _reference_losses(_model(demo_model_dir, lora=lora), settings)
    batches = _batches()

    model = _model(demo_model_dir, lora=lora)
    engine = prepare_training(model, settings, parallel, total_steps=STEPS, device=CPU)
    losses = _engine_losses(engine, batches[:2])
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    engine.save_hf(checkpoint)
    engine.save_state(checkpoint)
    losses += _engine_losses(engine, batches[2:])
    # Same weight decay, momentum/Adam moments and lr at every step: equal to float32 noise.
    assert losses == pytest.approx(expected, abs=1e-5)
    assert expected[2] < expected[0] and expected[3] < expected[1]

    saved_state = DEEPSPEED_STATE if zero_stage is not None else OPTIMIZER_STATE
    assert (checkpoint / saved_state).exists()
    exported = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (checkpoint / exported).is_file()
    resumed = _model(demo_model_dir, lora=lora, adapter_dir=checkpoint)
    again = prepare_training(resumed, settings, parallel, total_steps=STEPS, device=CPU)
    again.load_state(checkpoint)
    assert again.last_lr() == pytest.approx(_cosine_lr(settings, step=2))
    assert _engine_losses(again, batches[2:]) == pytest.approx(losses[2:], abs=1e-5)


@pytest.mark.parametrize("zero_stage", [None, 2])
def test_a_resumed_run_follows_its_own_schedule(
    process_group: None, demo_model_dir: Path, tmp_path: Path, zero_stage: int | None
) -> None:
    """A new attempt with more epochs resumes at the step it reached, on the cosine over
    its own total steps (not at the lr the shorter run ended on)."""
    settings = OPTIMIZERS["adamw"]
    engine = prepare_training(
        _model(demo_model_dir, lora=True), settings, Settings(zero_stage), total_steps=2, device=CPU
    )
    _engine_losses(engine, _batches()[:2])
    assert engine.last_lr() == pytest.approx(settings.lr_min)  # the end of a 2-step run
    engine.save_hf(tmp_path)
    engine.save_state(tmp_path)
    longer = prepare_training(
        _model(demo_model_dir, lora=True, adapter_dir=tmp_path),
        settings,
        Settings(zero_stage),
        total_steps=STEPS,
        device=CPU,
    )
    longer.load_state(tmp_path)
    assert longer.last_lr() == pytest.approx(_cosine_lr(settings, step=2))
    optimizer = longer.model.optimizer if zero_stage is not None else longer.optimizer
    assert [group["lr"] for group in optimizer.param_groups] == [longer.last_lr()]


@pytest.mark.parametrize("zero_stage", [None, 3])
def test_activation_checkpointing_changes_no_number(
    process_group: None, demo_model_dir: Path, zero_stage: int | None
) -> None:
    settings = OPTIMIZERS["adamw"]
    runs = []
    for checkpointing in (False, True):
        model = _model(demo_model_dir, lora=True)
        parallel = Settings(zero_stage, activation_checkpointing=checkpointing)
        engine = prepare_training(model, settings, parallel, total_steps=STEPS, device=CPU)
        runs.append(_engine_losses(engine, _batches()))
    inner = engine.model.module if zero_stage is not None else engine.model
    assert inner.get_base_model().is_activation_checkpointing
    assert runs[1] == pytest.approx(runs[0], abs=1e-6)


@pytest.mark.parametrize("zero_stage", [None, 2])
def test_bf16_trains_close_to_float32(
    process_group: None, demo_model_dir: Path, zero_stage: int | None
) -> None:
    settings = OPTIMIZERS["adamw"]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = _model(demo_model_dir, lora=True)
        parallel = Settings(zero_stage, dtype=dtype)
        engine = prepare_training(model, settings, parallel, total_steps=STEPS, device=CPU)
        runs[dtype] = _engine_losses(engine, _batches())
    assert runs["bfloat16"] != runs["float32"]  # it really computed in bf16
    assert runs["bfloat16"] == pytest.approx(runs["float32"], rel=2e-2)


def test_qlora_base_trains_under_zero2(process_group: None, demo_model_dir: Path) -> None:
    """ZeRO 1-2 shard only the adapter's optimizer state; the 4-bit base stays whole."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    base = AutoModelForCausalLM.from_pretrained(
        demo_model_dir, local_files_only=True, quantization_config=quantization
    )
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # packed 4-bit
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    settings = OPTIMIZERS["adamw"]
    engine = prepare_training(
        model, settings, Settings(2, dtype="bfloat16"), total_steps=STEPS, device=CPU
    )
    batch = _batches()[0]
    losses = _engine_losses(engine, [batch] * STEPS)
    assert losses[-1] < losses[0]


def test_deepspeed_config_follows_the_settings() -> None:
    config = deepspeed_config(
        Settings(3, cpu_offload=True, dtype="bfloat16", batch_size=4), hidden_size=64, use_gpu=False
    )
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}
    assert zero["stage3_param_persistence_threshold"] == 640  # norms stay whole
    assert config["bf16"] == {"enabled": True}
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 1
    plain = deepspeed_config(Settings(2), hidden_size=64, use_gpu=True)["zero_optimization"]
    assert plain == {"stage": 2}
