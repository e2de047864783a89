"""GPU check of the training and serving stack, run by hand on one lent GPU (not a test):

    python bench/gpu_check.py --quick      # one H100/H200, under ~5 minutes
    python bench/gpu_check.py              # more layers and steps
    python bench/gpu_check.py --dry-run    # the same code on the CPU, tiny shapes

It runs on a bare GPU machine that holds only Python, torch, transformers, peft and
accelerate: no Ray, DeepSpeed, vLLM or bitsandbytes, and no package registry. It goes
through the recipes' own code (jobs/distributed.py's `prepare_training`, jobs/sft_steps.py's
`build_model` and `train_step`, which import no Ray) and the transformers serving engine, in
one process (a process group of one), on Llama-3-8B-shaped models with random weights built
from a `LlamaConfig` (no download). The one extra it needs there is pydantic (the job
config); `bash bench/gpu_bundle.sh` unpacks its wheels into bench/.gpu-site (a few MB, found
by this script when present), to carry along:

1. LoRA, bf16 autocast over float32 weights, activation checkpointing, the DDP path the
   recipe takes without DeepSpeed: tokens/s and MFU.
2. DeepSpeed ZeRO-3 + LoRA, bf16 (only where DeepSpeed is installed): tokens/s and MFU.
3. QLoRA (only where bitsandbytes is installed): the base quantized to 4-bit NF4 as it
   loads, LoRA on top, bf16 compute: tokens/s, peak memory, and the loss falls.
4. bf16 against float32 (DDP path, autocast): same first loss within 1 %, and the speed-up.
5. Serving: the transformers engine in bf16, greedy decode tokens/s at batch 1 and 16.

What it cannot check on one bare GPU is printed as untested at the end (vLLM on GPU,
tensor parallelism, multi-GPU data parallelism, and 2-3 where their library is missing).

MFU counts model FLOPs per trained token: 2N forward + 2N backward through the activations
(+2N for weight gradients when the base trains) + 12*L*d*s for attention (PaLM, appendix
B), N the weights without the input embedding; recomputation by activation checkpointing is
not counted. The peak is dense bf16 (989 TFLOPS for H100/H200 SXM) unless --peak-tflops.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

# A bare GPU machine has the checkout but no installed Corral: find its packages (and the
# carried pydantic, bench/gpu_bundle.sh) by path. Appended, so an installed copy wins.
ROOT = Path(__file__).resolve().parents[1]
sys.path.extend(str(p) for p in (ROOT / "platform", ROOT, ROOT / "bench" / ".gpu-site"))

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig  # noqa: E402
from jobs.config import SFTJobConfig, TrainingDtype, ZeroStage  # noqa: E402
from jobs.distributed import TrainingEngine, prepare_training  # noqa: E402
from jobs.sft_steps import build_model, train_step  # noqa: E402
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions  # noqa: E402
from serve_apps.engines.transformers_engine import (  # noqa: E402
    TransformersEngine,
    TransformersEngineConfig,
)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
# The recipe's config refuses rows it could not learn from; this one is never trained on.
TEACHING_ROW = {
    "dialog": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
}
OPTIMIZER = OptimizerConfig(optimizer_type="adamw", lr=1e-4, lr_min=1e-5, weight_decay=0.0)
# A constant, larger lr for the check that the QLoRA loss falls in a few steps.
OPTIMIZER_FAST = OptimizerConfig(optimizer_type="adamw", lr=1e-3, lr_min=1e-3, weight_decay=0.0)
ADAPTER = LoraFinetuningConfig(
    lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
    apply_lora_to_mlp=True,
    apply_lora_to_output=False,
    rank=16,
    alpha=32,
)


@dataclass(frozen=True)
class Plan:
    device: torch.device
    layers: int  # of Llama 3 8B's 32
    seq_len: int
    batch_size: int
    steps: int  # timed, after one warm-up step
    shape: dict[str, int]
    serve_layers: int  # of the serving check's model
    new_tokens: int  # per request in the serving check


def llama3_8b_shape(layers: int) -> dict[str, int]:
    return {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": layers,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }


TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
}


def plan_for(args: argparse.Namespace) -> Plan:
    if args.dry_run:
        return Plan(torch.device("cpu"), 2, 32, 2, 2, TINY_SHAPE, serve_layers=2, new_tokens=8)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run to check the script on the CPU")
    steps = 5 if args.quick else 20
    serve_layers = args.serve_layers or (8 if args.quick else 32)
    return Plan(
        torch.device("cuda", 0),
        args.layers,
        args.seq_len,
        args.batch_size,
        steps,
        {},
        serve_layers=serve_layers,
        new_tokens=64 if args.quick else 256,
    )


def llama_config(plan: Plan, layers: int | None = None) -> LlamaConfig:
    shape: dict[str, Any] = dict(plan.shape) if plan.shape else llama3_8b_shape(plan.layers)
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(
        **shape,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights made directly on the device, in the dtype (an 8B model in float32
    on the CPU would take minutes to initialize)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def batch_of(plan: Plan, vocab_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    shape = (plan.batch_size, plan.seq_len)
    input_ids = torch.randint(0, vocab_size, shape, generator=generator)
    labels = input_ids.clone()
    labels[:, : plan.seq_len // 4] = -100  # a prompt that is not trained
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


@dataclass(frozen=True)
class Settings:
    """The parallel fields of a job config."""

    zero_stage: ZeroStage | None
    dtype: TrainingDtype
    batch_size: int
    activation_checkpointing: bool
    cpu_offload: bool = False


def model_flops_per_token(config: LlamaConfig, seq_len: int, *, base_trains: bool) -> float:
    embedding = config.vocab_size * config.hidden_size
    weights = _llama_parameter_count(config) - embedding
    per_weight = 6 if base_trains else 4
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float(per_weight * weights + attention)


def _llama_parameter_count(config: LlamaConfig) -> int:
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    kv = d * kv_heads // config.num_attention_heads
    layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return config.num_hidden_layers * layer + 2 * v * d + d


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def timed_steps(
    engine: TrainingEngine, batch: dict[str, torch.Tensor], plan: Plan
) -> tuple[list[float], float]:
    """Losses of a warm-up step and `plan.steps` timed ones on the same batch, and the
    trained tokens per second over the timed ones."""
    losses = [train_step(engine.model, engine, batch, plan.device)[0]]
    _synchronize(plan.device)
    started = time.perf_counter()
    for _ in range(plan.steps):
        losses.append(train_step(engine.model, engine, batch, plan.device)[0])
    _synchronize(plan.device)
    elapsed = time.perf_counter() - started
    trained = int((batch["labels"][:, 1:] != -100).sum())
    return losses, trained * plan.steps / elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on CPU"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- the checks


def check_lora(plan: Plan, peak: float | None, *, zero_stage: ZeroStage | None) -> None:
    """LoRA on every linear layer of the 8B shape. Without a ZeRO stage this is the
    recipe's DDP path (float32 weights, bf16 autocast); with stage 3, DeepSpeed in bf16."""
    from peft import LoraConfig, get_peft_model

    config = llama_config(plan)
    base = random_model(
        config, plan.device, torch.float32 if zero_stage is None else torch.bfloat16
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    settings = Settings(zero_stage, "bfloat16", plan.batch_size, activation_checkpointing=True)
    engine = prepare_training(model, OPTIMIZER, settings, total_steps=100, device=plan.device)
    losses, rate = timed_steps(engine, batch_of(plan, config.vocab_size), plan)
    flops = model_flops_per_token(config, plan.seq_len, base_trains=False)
    mfu = f"{rate * flops / (peak * 1e12):.1%}" if peak else "n/a (no known peak)"
    what = (
        "LoRA, DDP path, bf16 autocast over float32 weights"
        if zero_stage is None
        else f"ZeRO-{zero_stage} + LoRA, bf16"
    )
    print(
        f"{what}, activation checkpointing, {config.num_hidden_layers} layers, "
        f"batch {plan.batch_size} x {plan.seq_len}: {rate:,.0f} tokens/s, MFU {mfu}, "
        f"peak memory {_peak_memory_gib(plan.device)}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    del engine, model, base


def check_qlora(plan: Plan, workdir: Path) -> None:
    layers = 4 if plan.device.type == "cuda" else plan.layers
    config = llama_config(plan, layers=layers)
    model_dir = workdir / "llama-4bit-check"
    base = random_model(config, plan.device, torch.bfloat16)
    base.save_pretrained(str(model_dir))  # then loaded back, and quantized, as a job does
    bf16_gib = sum(p.numel() for p in base.parameters()) * 2 / 2**30
    del base
    _reset_memory(plan.device)
    job = SFTJobConfig(
        job_key="gpu-check",
        model_dir=model_dir,
        output_dir=workdir / "out",
        rows=[TEACHING_ROW],
        validation_rows=[],
        algorithm="qlora",
        adapter=ADAPTER,
        optimizer=OPTIMIZER,
        n_epochs=1,
        n_iters=1,
        batch_size=plan.batch_size,
        use_gpu=plan.device.type == "cuda",
        dtype="bfloat16",
    )
    model = build_model(job, None)  # the recipe's own QLoRA path
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer")
    quantized = type(q_proj).__name__
    settings = Settings(None, "bfloat16", plan.batch_size, activation_checkpointing=True)
    engine = prepare_training(model, OPTIMIZER_FAST, settings, total_steps=100, device=plan.device)
    losses, rate = timed_steps(engine, batch_of(plan, config.vocab_size), plan)
    falls = "falls" if losses[-1] < losses[0] else "DOES NOT FALL"
    print(
        f"QLoRA ({quantized}, NF4), bf16 compute, {layers} layers: {rate:,.0f} tokens/s, "
        f"peak memory {_peak_memory_gib(plan.device)} (bf16 weights alone: {bf16_gib:.1f} GiB), "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} ({falls})"
    )
    del engine, model


def check_bf16_against_float32(plan: Plan) -> None:
    layers = 2 if plan.device.type == "cuda" else plan.layers
    config = llama_config(plan, layers=layers)
    batch = batch_of(plan, config.vocab_size)
    results: dict[str, tuple[float, float]] = {}
    for dtype in ("float32", "bfloat16"):
        _reset_memory(plan.device)
        model = random_model(config, plan.device, torch.float32)
        settings = Settings(None, dtype, plan.batch_size, activation_checkpointing=True)
        engine = prepare_training(model, OPTIMIZER, settings, total_steps=100, device=plan.device)
        losses, rate = timed_steps(engine, batch, plan)
        results[dtype] = (losses[0], rate)
        del engine, model
    (loss32, rate32), (loss16, rate16) = results["float32"], results["bfloat16"]
    agree = "agree" if abs(loss16 - loss32) <= 0.01 * abs(loss32) else "DISAGREE"
    print(
        f"bf16 autocast vs float32, full fine-tune of {layers} layers: first loss "
        f"{loss16:.4f} vs {loss32:.4f} ({agree} within 1 %), {rate16:,.0f} vs "
        f"{rate32:,.0f} tokens/s ({rate16 / rate32:.2f}x)"
    )


def check_serving(plan: Plan, workdir: Path) -> None:
    """The transformers serving engine in bf16 on the 8B shape (random weights, the demo
    tokenizer, the vocabulary cut to the tokenizer's): greedy decode tokens/s at batch 1 and
    16 after a warm-up call. Random weights may stop early at an end token; only the tokens
    actually generated are counted."""
    from corral.demo_model import build_demo_model

    tokenizer = AutoTokenizer.from_pretrained(
        build_demo_model(workdir / "demo-tokenizer"), local_files_only=True
    )
    config = llama_config(plan, layers=plan.serve_layers)
    config.vocab_size = len(tokenizer)
    model_dir = workdir / "serve-model"
    model = random_model(config, plan.device, torch.bfloat16)
    model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    del model
    _reset_memory(plan.device)
    engine = TransformersEngine(
        TransformersEngineConfig(model_dir, device=plan.device.type, dtype="bfloat16")
    )
    request = GenerationRequest(
        prompt="The llamas graze on the high plateau, and then",
        sampling=SamplingOptions(max_tokens=plan.new_tokens),
    )
    engine.generate([request])  # warm-up: kernels, allocator
    figures = []
    for batch in (1, 16):
        _synchronize(plan.device)
        started = time.perf_counter()
        results = engine.generate([request] * batch)
        _synchronize(plan.device)
        generated = sum(len(result.token_ids) for result in results)
        figures.append(
            f"batch {batch}: {generated / (time.perf_counter() - started):,.0f} tokens/s"
        )
    print(
        f"serving (transformers engine, bf16, greedy, {plan.serve_layers} layers, up to "
        f"{plan.new_tokens} new tokens): {', '.join(figures)}, "
        f"peak memory {_peak_memory_gib(plan.device)}"
    )
    del engine


def _one_process_group(device: torch.device, workdir: Path) -> None:
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init = f"file://{workdir / 'process-group'}"
    dist.init_process_group(backend, init_method=init, rank=0, world_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (~5 min on an H100)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--layers", type=int, default=32, help="of Llama 3 8B's 32 (check 1)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument(
        "--serve-layers", type=int, default=None, help="serving check (default 8 quick, 32)"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()
    # DeepSpeed calls torch.distributed functions that torch 2.13 deprecates, every step.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    plan = plan_for(args)
    peak = peak_tflops(plan.device, args.peak_tflops)
    where = torch.cuda.get_device_name(plan.device) if plan.device.type == "cuda" else "CPU"
    print(f"device: {where}; torch {torch.__version__}; plan: {plan}")
    with tempfile.TemporaryDirectory(prefix="corral-gpu-check-") as tmp:
        workdir = Path(tmp)
        _one_process_group(plan.device, workdir)
        checks: list[tuple[str, Callable[[], Any]]] = [
            ("lora", lambda: check_lora(plan, peak, zero_stage=None))
        ]
        untested = [
            "vLLM on GPU (not installed on a bare GPU machine; its CPU build runs in CI)",
            "tensor parallelism and multi-GPU data parallelism (one GPU)",
        ]
        if importlib.util.find_spec("deepspeed") is not None:
            checks.append(("zero3-lora", lambda: check_lora(plan, peak, zero_stage=3)))
        else:
            untested.append("DeepSpeed ZeRO (DeepSpeed is not installed)")
        if importlib.util.find_spec("bitsandbytes") is not None:
            checks.append(("qlora", lambda: check_qlora(plan, workdir)))
        else:
            untested.append("QLoRA (bitsandbytes is not installed)")
        checks.append(("bf16", lambda: check_bf16_against_float32(plan)))
        checks.append(("serving", lambda: check_serving(plan, workdir)))
        failed = []
        try:
            for name, check in checks:
                started = time.perf_counter()
                try:
                    check()
                except Exception as exc:  # report every check, then fail at the end
                    failed.append(name)
                    print(f"{name}: FAILED: {type(exc).__name__}: {exc}")
                print(f"  ({name} took {time.perf_counter() - started:.0f} s)")
                _reset_memory(plan.device)
        finally:
            dist.destroy_process_group()
    print("untested here: " + "; ".join(untested))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
