"""The SFT recipe on a real local Ray cluster and the demo model: it learns a fixed answer,
reports to the store as it goes, and saves checkpoints that load back."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from corral.api.post_training import LoraFinetuningConfig, OptimizerConfig
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from jobs.sft import SFTJobConfig, main
from tests.conftest import PEFT_DEPRECATION

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "What is Corral?"
ANSWER = "Corral fine-tunes Llama models on Ray."
TENANT = "t"


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
    db: Database, model_dir: Path, output_dir: Path, job_uuid: str, **overrides: Any
) -> SFTJobConfig:
    with db.transaction() as session:
        JobStore(session).create(
            job_uuid=job_uuid, tenant=TENANT, kind=JobKind.SUPERVISED_FINE_TUNE, request={}
        )
    settings: dict[str, Any] = {
        "job_uuid": job_uuid,
        "database_url": db.url,
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
    config = _config(sqlite_database, demo_model_dir, tmp_path / "out", "sft-lora")
    main(config)

    with sqlite_database.transaction() as session:
        store = JobStore(session)
        job = store.get("sft-lora", tenant=TENANT)
        lines = [line.line for line in store.log_lines("sft-lora")]
        checkpoints = [(c.iters, c.path, c.metrics) for c in store.checkpoints("sft-lora")]
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
        lines = [line.line for line in store.log_lines(job_uuid)]
        checkpoints = store.checkpoints(job_uuid)
    assert job.status == JobStatus.COMPLETED, lines
    assert [c.iters for c in checkpoints] == [1]  # n_iters caps the epoch at one step
    assert (Path(checkpoints[0].path) / saved_file).is_file()
    assert (Path(checkpoints[0].path) / "tokenizer.json").is_file()


def test_a_new_attempt_resumes_from_the_last_checkpoint(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    """Attempt 0 trains epoch 1 of 2 and is lost; attempt 1 starts at epoch 2."""
    first = _config(sqlite_database, demo_model_dir, tmp_path / "first", "sft-first", n_epochs=1)
    main(first)
    with sqlite_database.transaction() as session:
        [saved] = JobStore(session).checkpoints("sft-first")
    config = _config(sqlite_database, demo_model_dir, tmp_path / "out", "sft-resumed", n_epochs=2)
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        store.transition("sft-resumed", to=JobStatus.RUNNING)
        store.add_checkpoint("sft-resumed", iters=saved.iters, path=saved.path)
        store.transition("sft-resumed", to=JobStatus.SCHEDULED)  # requeued: attempt 1
    main(config)
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        job = store.get("sft-resumed", tenant=TENANT)
        lines = [line.line for line in store.log_lines("sft-resumed")]
        iters = [c.iters for c in store.checkpoints("sft-resumed")]
    assert job.status == JobStatus.COMPLETED, lines
    assert lines[0].startswith("attempt 1: lora on 2 workers, resuming from ")
    assert [line.split()[1] for line in lines if line.startswith("step ")] == ["5", "6", "7", "8"]
    assert not any(line.startswith("epoch 0 ") for line in lines)
    assert iters == [4, 8]
    assert (tmp_path / "out" / "ray" / "sft-resumed-attempt-1").is_dir()


def test_a_cancelled_job_does_not_train(
    sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = _config(sqlite_database, demo_model_dir, tmp_path / "out", "sft-cancelled")
    with sqlite_database.transaction() as session:
        JobStore(session).transition("sft-cancelled", to=JobStatus.CANCELLED)
    main(config)  # returns without starting a trainer
    with sqlite_database.transaction() as session:
        store = JobStore(session)
        assert store.status_of("sft-cancelled") == JobStatus.CANCELLED
        assert store.log_lines("sft-cancelled") == []
    assert not (tmp_path / "out").exists()


def test_qlora_is_refused_clearly(
    ray_cluster: Any, sqlite_database: Database, demo_model_dir: Path, tmp_path: Path
) -> None:
    config = _config(
        sqlite_database, demo_model_dir, tmp_path / "q", "sft-qlora", algorithm="qlora"
    )
    with pytest.raises(Exception, match="qlora"):
        main(config)
    with sqlite_database.transaction() as session:
        job = JobStore(session).get("sft-qlora", tenant=TENANT)
    assert job.status == JobStatus.FAILED
    assert job.error is not None and "qlora" in job.error
