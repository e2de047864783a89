"""The SFT recipe on a real local Ray cluster and the demo model: it learns a fixed answer,
reports to the store as it goes, and saves checkpoints that load back."""

from __future__ import annotations

import json
import re
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from safetensors import safe_open

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.tenancy import job_key
from jobs.config import SFTJobConfig
from jobs.sft import main
from tests.conftest import PEFT_DEPRECATION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "What is Corral?"
ANSWER = "Corral fine-tunes Llama models on Ray."
TENANT = "t"


def _key(job_uuid: str) -> str:
    """The key the store (and the recipe) knows a job by."""
    return job_key(TENANT, job_uuid)


def _dialog(system: str) -> dict[str, Any]:
    return {
        "dialog": [
            {"role": "system", "content": system},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": ANSWER},
        ]
    }


SYSTEMS = [
    "You are a helpful assistant.",
    "You are a careful assistant who answers briefly.",
    "Answer the question.",
    "You are Corral's assistant.",
    "Be brief.",
    "You answer questions about software.",
    "You are a friendly guide.",
    "Reply in one sentence.",
]
ROWS = [_dialog(system) for system in SYSTEMS]
VALIDATION_ROWS = [_dialog("You are a new assistant."), _dialog("Say it plainly.")]


def _config(
    db: Database,
    model_dir: Path,
    output_dir: Path,
    job_uuid: str,
    *,
    logger_config: dict[str, Any] | None = None,
    **overrides: Any,
) -> SFTJobConfig:
    """The job's row (its request's `logger_config`, its launch's `output_dir`, as the API
    stores them) and its recipe config."""
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid=job_uuid,
            tenant=TENANT,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            request={"logger_config": logger_config or {}},
            launch={"output_dir": str(output_dir)},
        )
    settings: dict[str, Any] = {
        "job_key": _key(job_uuid),
        "report_to": {"database_url": db.url},
        "model_dir": model_dir,
        "output_dir": output_dir,
        "rows": ROWS,
        "validation_rows": VALIDATION_ROWS,
        "algorithm": "lora",
        "adapter": LoraFinetuningConfig(
            lora_attn_modules=["q_proj", "k_proj", "v_proj", "output_proj"],
            apply_lora_to_mlp=True,
            # The demo model's lm_head is random: without an adapter there it learns slowly.
            apply_lora_to_output=True,
            rank=8,
            alpha=64,
        ),
        "optimizer": OptimizerConfig(optimizer_type="adamw", lr=3e-3, lr_min=3e-4, weight_decay=0),
        "n_epochs": 3,
        "n_iters": 100,
        "batch_size": 1,
        "num_workers": 2,
    }
    return SFTJobConfig(**(settings | overrides))


def _validation_losses(lines: list[str]) -> list[float]:
    return [float(m.group(1)) for line in lines if (m := re.search(r"validation loss (\S+)", line))]


def test_lora_sft_learns_and_reports(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = _config(
        sqlite_database,
        demo_model_dir,
        tmp_path / "out",
        "sft-lora",
        logger_config={"tensorboard": True},
    )
    main(config)

    with sqlite_database.transaction() as session:
        store = JobStore(session)
        job = store.get("sft-lora", tenant=TENANT)
        lines = [line.line for line in store.log_lines(_key("sft-lora"))]
        checkpoints = [(c.iters, c.path, c.metrics) for c in store.checkpoints(_key("sft-lora"))]
        per_step = [(m.step, m.epoch, m.values) for m in store.metrics(_key("sft-lora"))]
        progress = store.progress(job)
    assert job.status == JobStatus.COMPLETED, lines
    assert job.started_at is not None and job.completed_at is not None
    assert job.resources_allocated == {"num_workers": 2, "use_gpu": False}
    step_lines = [line for line in lines if line.startswith("step ")]
    # 8 rows / (2 workers * 1 per batch) = 4 steps per epoch.
    assert len(step_lines) == 12, lines
    assert re.fullmatch(r"step 1 loss \d+\.\d+ lr 3\.000e-03 tokens/s \d+", step_lines[0])
    losses = _validation_losses(lines)
    assert len(losses) == 4, lines  # before training and after each epoch
    assert losses[-1] < 0.5 * losses[0], losses

    assert [iters for iters, _, _ in checkpoints] == [4, 8, 12]
    for _, path, metrics in checkpoints:
        assert (Path(path) / "adapter_config.json").is_file()
        assert metrics is not None and set(metrics) == {"loss", "validation_loss"}
    assert checkpoints[-1][2]["validation_loss"] == pytest.approx(losses[-1], abs=1e-4)

    # The same figures as data: a row per step (0: the baseline validation), the epoch's
    # validation loss on its last step, the planned total on the job.
    assert [(step, epoch) for step, epoch, _ in per_step] == [(0, 0)] + [
        (step, (step - 1) // 4 + 1) for step in range(1, 13)
    ]
    assert per_step[0][2] == {"validation_loss": pytest.approx(losses[0], abs=1e-4)}
    assert set(per_step[1][2]) == {"loss", "learning_rate", "tokens_per_second"}
    assert per_step[1][2]["learning_rate"] == pytest.approx(3e-3)
    assert [s for s, _, values in per_step if "validation_loss" in values] == [0, 4, 8, 12]
    assert per_step[-1][2]["validation_loss"] == pytest.approx(losses[-1], abs=1e-4)
    assert per_step[-1][2]["loss"] == pytest.approx(checkpoints[-1][2]["loss"])
    assert progress is not None and (progress.step, progress.total_steps) == (12, 12)
    # ... and as TensorBoard event files beside the checkpoints (`logger_config`).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(s, pytest.approx(v["loss"])) for s, _, v in per_step[1:]]
    assert [e.step for e in events.Scalars("validation_loss")] == [0, 4, 8, 12]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, local_files_only=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", PEFT_DEPRECATION, FutureWarning)
        tuned = PeftModel.from_pretrained(base, checkpoints[-1][1])
    assert tuned.peft_config["default"].r == 8


@pytest.mark.parametrize(
    ("algorithm", "saved_file"), [("dora", "adapter_config.json"), ("full", "model.safetensors")]
)
def test_dora_and_full_train_one_step(
    ray_cluster: Any,
    sqlite_database: Database,
    demo_model_dir: Path,
    tmp_path: Path,
    algorithm: str,
    saved_file: str,
) -> None:
    job_uuid = f"sft-{algorithm}"
    config = _config(
        sqlite_database,
        demo_model_dir,
        tmp_path / "out",
        job_uuid,
        algorithm=algorithm,
        n_epochs=1,
        n_iters=1,
    )
    main(config)
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        job = store.get(job_uuid, tenant=TENANT)
        lines = [line.line for line in store.log_lines(_key(job_uuid))]
        checkpoints = store.checkpoints(_key(job_uuid))
    assert job.status == JobStatus.COMPLETED, lines
    assert [c.iters for c in checkpoints] == [1]  # n_iters caps the epoch at one step
    saved = Path(checkpoints[0].path)
    assert (saved / saved_file).is_file()
    assert (saved / "tokenizer.json").is_file()
    if algorithm == "dora":
        # A DoRA adapter, not a plain LoRA one: peft's config says so, and the saved
        # weights carry DoRA's per-column magnitude vectors.
        adapter_config = json.loads((saved / "adapter_config.json").read_text())
        assert adapter_config["use_dora"] is True
        with safe_open(str(saved / "adapter_model.safetensors"), framework="pt") as weights:
            assert any("lora_magnitude_vector" in key for key in weights.keys())  # noqa: SIM118


def test_a_new_attempt_resumes_from_the_last_checkpoint(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """Attempt 0 trains epoch 1 of 2 and is lost; attempt 1 starts at epoch 2."""
    first = _config(sqlite_database, demo_model_dir, tmp_path / "first", "sft-first", n_epochs=1)
    main(first)
    with sqlite_database.transaction() as session:
        [saved] = JobStore(session).checkpoints(_key("sft-first"))
    config = _config(sqlite_database, demo_model_dir, tmp_path / "out", "sft-resumed", n_epochs=2)
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        store.transition(_key("sft-resumed"), to=JobStatus.RUNNING)
        store.add_checkpoint(_key("sft-resumed"), iters=saved.iters, path=saved.path)
        store.transition(_key("sft-resumed"), to=JobStatus.SCHEDULED)  # requeued: attempt 1
    main(config)
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        job = store.get("sft-resumed", tenant=TENANT)
        lines = [line.line for line in store.log_lines(_key("sft-resumed"))]
        iters = [c.iters for c in store.checkpoints(_key("sft-resumed"))]
    assert job.status == JobStatus.COMPLETED, lines
    assert lines[0].startswith("attempt 1: lora on 2 workers, resuming from ")
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["5", "6", "7", "8"]
    assert not any(line.startswith("epoch 0 ") for line in lines)
    assert iters == [4, 8]
    assert (tmp_path / "out" / "ray" / f"{_key('sft-resumed')}-attempt-1").is_dir()


def test_a_cancelled_job_does_not_train(
    sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = _config(sqlite_database, demo_model_dir, tmp_path / "out", "sft-cancelled")
    with sqlite_database.transaction() as session:
        JobStore(session).transition(_key("sft-cancelled"), to=JobStatus.CANCELLED)
    main(config)  # returns without starting a trainer
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        assert store.status_of(_key("sft-cancelled")) == JobStatus.CANCELLED
        assert store.log_lines(_key("sft-cancelled")) == []
    assert not (tmp_path / "out").exists()


def _finished(db: Database, job_uuid: str) -> tuple[list[str], list[Any]]:
    """The job's log lines and checkpoint rows, after checking that it completed."""
    with db.transaction() as session:
        store = JobStore(session)
        status = store.status_of(_key(job_uuid))
        lines = [line.line for line in store.log_lines(_key(job_uuid))]
        checkpoints = store.checkpoints(_key(job_uuid))
    assert status == JobStatus.COMPLETED, lines
    return lines, checkpoints


def _step_losses(lines: list[str]) -> list[float]:
    return [float(line.split()[3]) for line in lines if line.startswith("step ")]


def _validation_loss_of(model: Any, model_dir: Path, *, dtype: Any = None) -> float:
    """What the recipe logs as validation loss, computed here in one process: the
    token-weighted loss over VALIDATION_ROWS."""
    import torch
    from transformers import AutoTokenizer

    from jobs.sft_steps import token_loss_sum
    from jobs.training_data import pad_batch, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    dialogs = tokenize_rows(tokenizer, VALIDATION_ROWS, max_seq_len=2048)
    batch = pad_batch(dialogs, pad_id=tokenizer.pad_token_id)
    precision = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
    with torch.no_grad(), precision:
        loss_sum, count = token_loss_sum(model.eval(), batch, torch.device("cpu"))
    return float(loss_sum / count)


def _load_adapter(base_dir: Path, adapter_dir: Path, **base_options: Any) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, **base_options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", PEFT_DEPRECATION, FutureWarning)
        return PeftModel.from_pretrained(base, str(adapter_dir))


def test_zero2_lora_with_activation_checkpointing_exports_and_resumes(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """DeepSpeed ZeRO-2 trains a LoRA adapter that peft loads over the base and that
    scores the validation rows as the sharded model did; a new attempt resumes DeepSpeed's
    optimizer and schedule from it."""
    settings: dict[str, Any] = {
        "zero_stage": 2,
        "activation_checkpointing": True,
        "shuffle": False,
        "n_iters": 2,
    }
    first = _config(
        sqlite_database, demo_model_dir, tmp_path / "first", "sft-z2", n_epochs=1, **settings
    )
    main(first)
    lines, checkpoints = _finished(sqlite_database, "sft-z2")
    assert "parallelism: DeepSpeed ZeRO-2, activation checkpointing, float32" in lines
    [saved] = checkpoints
    directory = Path(saved.path)
    assert (directory / "deepspeed").is_dir()  # optimizer shards and schedule
    from safetensors.torch import load_file

    saved_weights = load_file(directory / "adapter_model.safetensors")
    assert saved_weights and all("lora_" in key for key in saved_weights)  # no base copied
    tuned = _load_adapter(demo_model_dir, directory)
    logged = _validation_losses(lines)[-1]
    assert _validation_loss_of(tuned, demo_model_dir) == pytest.approx(logged, abs=2e-4)

    resumed = _config(
        sqlite_database, demo_model_dir, tmp_path / "out", "sft-z2-resumed", n_epochs=2, **settings
    )
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        store.transition(_key("sft-z2-resumed"), to=JobStatus.RUNNING)
        store.add_checkpoint(_key("sft-z2-resumed"), iters=saved.iters, path=saved.path)
        store.transition(_key("sft-z2-resumed"), to=JobStatus.SCHEDULED)  # requeued: attempt 1
    main(resumed)
    lines, checkpoints = _finished(sqlite_database, "sft-z2-resumed")
    steps = [line.split() for line in lines if line.startswith("step ")]
    assert [step[1] for step in steps] == ["3", "4"]
    # Step 3 of 4 on the cosine from 3e-3 to 3e-4: the restored schedule, not a fresh one.
    assert steps[0][5] == "1.650e-03", lines
    assert [c.iters for c in checkpoints] == [2, 4]


def test_zero3_full_exports_weights_that_match_training(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """Under ZeRO-3 each worker holds a shard of every large weight; the export gathers
    them into a Hugging Face model that scores the validation rows as training did."""
    import torch
    from transformers import AutoModelForCausalLM

    config = _config(
        sqlite_database,
        demo_model_dir,
        tmp_path / "out",
        "sft-z3",
        algorithm="full",
        zero_stage=3,
        n_epochs=1,
        n_iters=2,
        optimizer=OptimizerConfig(optimizer_type="adamw", lr=1e-3, lr_min=1e-4, weight_decay=0),
    )
    main(config)
    lines, [saved] = _finished(sqlite_database, "sft-z3")
    assert "parallelism: DeepSpeed ZeRO-3, float32" in lines
    exported = AutoModelForCausalLM.from_pretrained(saved.path, local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(demo_model_dir, local_files_only=True)
    for name, tensor in base.state_dict().items():
        assert exported.state_dict()[name].shape == tensor.shape, name
    trained = exported.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(trained, base.model.layers[0].self_attn.q_proj.weight)
    logged = _validation_losses(lines)[-1]
    assert _validation_loss_of(exported, demo_model_dir) == pytest.approx(logged, abs=2e-4)


def test_qlora_learns_in_bf16_and_its_adapter_loads_over_the_base(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """A 4-bit NF4 base under DDP (its frozen weights stay out of DDP), bf16 compute."""
    import json

    import torch
    from transformers import BitsAndBytesConfig

    config = _config(
        sqlite_database,
        demo_model_dir,
        tmp_path / "out",
        "sft-qlora",
        algorithm="qlora",
        dtype="bfloat16",
        n_epochs=1,
    )
    main(config)
    lines, [saved] = _finished(sqlite_database, "sft-qlora")
    assert "parallelism: DDP, bfloat16" in lines
    losses = _step_losses(lines)
    assert len(losses) == 4 and losses[-1] < losses[0], lines
    before, after = _validation_losses(lines)
    assert after < 0.9 * before, lines  # 4 steps

    adapter_config = json.loads((Path(saved.path) / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(demo_model_dir)  # unquantized
    served = _load_adapter(demo_model_dir, Path(saved.path))  # as the inference server does
    assert _validation_loss_of(served, demo_model_dir) < before
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    as_trained = _load_adapter(demo_model_dir, Path(saved.path), quantization_config=quantization)
    recomputed = _validation_loss_of(as_trained, demo_model_dir, dtype=torch.bfloat16)
    assert recomputed == pytest.approx(after, abs=2e-2)  # bf16 sums in another order


def test_cpu_offload_trains_with_deepspeeds_cpu_adam(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """ZeRO-3 with the optimizer and weights in CPU memory. The first run on a machine
    compiles DeepSpeed's CPU Adam (about a minute, cached in TORCH_EXTENSIONS_DIR)."""
    config = _config(
        sqlite_database,
        demo_model_dir,
        tmp_path / "out",
        "sft-offload",
        zero_stage=3,
        cpu_offload=True,
        n_epochs=1,
        n_iters=2,
    )
    main(config)
    lines, [saved] = _finished(sqlite_database, "sft-offload")
    assert "parallelism: DeepSpeed ZeRO-3, CPU offload, float32" in lines
    assert (Path(saved.path) / "adapter_model.safetensors").is_file()
    before, after = _validation_losses(lines)
    assert after < before


def test_settings_that_cannot_work_are_refused_with_the_reason(
    sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="cpu_offload needs DeepSpeed ZeRO"):
        _config(sqlite_database, demo_model_dir, tmp_path, "sft-bad-1", cpu_offload=True)
    with pytest.raises(ValidationError, match="qlora cannot run under ZeRO-3"):
        _config(
            sqlite_database, demo_model_dir, tmp_path, "sft-bad-2", algorithm="qlora", zero_stage=3
        )
    for stage in (None, 0, 1, 2):  # what the API may pick for qlora
        _config(
            sqlite_database,
            demo_model_dir,
            tmp_path,
            f"sft-ok-{stage}",
            algorithm="qlora",
            zero_stage=stage,
        )
