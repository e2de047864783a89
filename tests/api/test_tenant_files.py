"""Checkpoints and dataset files belong to tenants, over HTTP on both database backends:
tenant beta cannot register or fine-tune from alpha's checkpoints, nor read alpha's
dataset files, not even through a link in its own directory; the refusal reads the same
whether or not the file is there. Shared model directories stay open to everyone.

The app has a real model registry (not started: nothing here needs Serve, since every
refusal comes before a deploy) and a recording launcher."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.config import Settings
from corral.store.db import Database
from corral.store.tables import Dataset, Job, ServedModel
from corral.tenancy import job_checkpoint_dir, tenant_dir
from tests.api.conftest import ALPHA, BETA, training_app
from tests.api.test_fine_tuning_api import RecordingLauncher
from tests.api.training_requests import ONE_STEP

pytestmark = pytest.mark.integration

DPO_PATH = "/post_training/preference_optimize/"
SFT_PATH = "/post_training/supervised_fine_tune/"
PREFERENCES = {"prompt": "dialog", "chosen": "text", "rejected": "text"}
PREFERENCE_ROW = {
    "prompt": [{"role": "user", "content": "Name a colour."}],
    "chosen": "Blue.",
    "rejected": "I will not.",
}
DIALOG_ROW = {
    "dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
}


@pytest.fixture
def launcher() -> RecordingLauncher:
    return RecordingLauncher()


@pytest.fixture
def client(
    settings: Settings, database: Database, launcher: RecordingLauncher, demo_model_dir: Path
) -> Iterator[TestClient]:
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _dataset(path: Path | str, columns: dict[str, str]) -> dict[str, Any]:
    url = path.as_uri() if isinstance(path, Path) else path
    return {"columns": columns, "content_url": url, "metadata": {}}


COMMON = {
    "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-3, "lr_min": 1e-4, "weight_decay": 0},
    "training_config": ONE_STEP,
    "hyperparam_search_config": {},
    "logger_config": {},
}


def _dpo(job_uuid: str, model: Path, prefs: Path) -> dict[str, Any]:
    return COMMON | {
        "job_uuid": job_uuid,
        "finetuned_model": model.as_uri(),
        "dataset": _dataset(prefs, PREFERENCES),
        "validation_dataset": _dataset(prefs, PREFERENCES),
        "algorithm": "dpo",
        "algorithm_config": {"reward_scale": 0.1, "reward_clip": 0, "epsilon": 0, "gamma": 0},
    }


def _sft(job_uuid: str, dialogs: Path) -> dict[str, Any]:
    return COMMON | {
        "job_uuid": job_uuid,
        "model": "llama3_8b",
        "dataset": _dataset(dialogs, {"dialog": "dialog"}),
        "validation_dataset": _dataset(dialogs, {"dialog": "dialog"}),
        "algorithm": "lora",
        "algorithm_config": {
            "lora_attn_modules": ["q_proj"],
            "apply_lora_to_mlp": False,
            "apply_lora_to_output": False,
            "rank": 2,
            "alpha": 4,
        },
    }


def _message(response: Any) -> str:
    assert response.status_code == 422, response.text
    message: str = response.json()["error"]["message"]
    return message


def _rows(database: Database, table: type[Any]) -> list[Any]:
    with database.transaction() as session:
        return list(session.query(table).all())


def test_checkpoints_are_used_only_by_the_tenant_whose_job_made_them(
    client: TestClient,
    database: Database,
    launcher: RecordingLauncher,
    settings: Settings,
    shared_dataset_root: Path,
    demo_model_dir: Path,
) -> None:
    alpha_job = job_checkpoint_dir(settings.checkpoints_dir, "alpha", "sft-0")
    checkpoint = alpha_job / "checkpoints" / "iter-4"
    shutil.copytree(demo_model_dir, checkpoint)
    adapter = alpha_job / "lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    beta_dir = tenant_dir(settings.checkpoints_dir, "beta")
    beta_dir.mkdir()
    (beta_dir / "borrowed").symlink_to(checkpoint)
    alpha_prefs = _write(tenant_dir(shared_dataset_root, "alpha") / "p.jsonl", [PREFERENCE_ROW])
    beta_prefs = _write(tenant_dir(shared_dataset_root, "beta") / "p.jsonl", [PREFERENCE_ROW])

    # DPO from alpha's checkpoint: refused for beta exactly as a path where nothing is.
    taken = _message(client.post(DPO_PATH, json=_dpo("d-1", checkpoint, beta_prefs), headers=BETA))
    absent = alpha_job / "checkpoints" / "iter-99"
    nothing = _message(client.post(DPO_PATH, json=_dpo("d-1", absent, beta_prefs), headers=BETA))
    assert taken == nothing and "your own jobs" in taken
    assert "alpha" not in taken.replace(str(settings.home.parent), "")
    linked = client.post(
        DPO_PATH, json=_dpo("d-1", beta_dir / "borrowed", beta_prefs), headers=BETA
    )
    assert _message(linked) == taken

    # Registering it (as the model or as the adapter over a shared base): refused too.
    for body in (
        {"name": "stolen", "checkpoint_dir": str(checkpoint)},
        {"name": "stolen", "checkpoint_dir": str(beta_dir / "borrowed")},
        {"name": "stolen", "checkpoint_dir": str(demo_model_dir), "adapter_dir": str(adapter)},
    ):
        assert "your own jobs" in _message(client.post("/models/register", json=body, headers=BETA))
    assert _rows(database, ServedModel) == [] and _rows(database, Job) == []
    assert launcher.submitted == []

    # Alpha fine-tunes from its own checkpoint; everyone may start from a shared model.
    mine = client.post(DPO_PATH, json=_dpo("d-1", checkpoint, alpha_prefs), headers=ALPHA)
    assert mine.status_code == 200, mine.text
    shared = client.post(DPO_PATH, json=_dpo("d-2", demo_model_dir, beta_prefs), headers=BETA)
    assert shared.status_code == 200, shared.text
    launches = {job.uuid: (job.tenant, job.launch["model_dir"]) for job in _rows(database, Job)}
    assert launches == {
        "d-1": ("alpha", str(checkpoint)),
        "d-2": ("beta", str(demo_model_dir.resolve())),
    }
    # Each job writes its checkpoints inside its own tenant's directory.
    outputs = {job.uuid: job.launch["output_dir"] for job in _rows(database, Job)}
    assert outputs["d-2"] == str(job_checkpoint_dir(settings.checkpoints_dir, "beta", "d-2"))


def test_dataset_files_are_read_only_from_the_callers_own_directory(
    client: TestClient, database: Database, launcher: RecordingLauncher, shared_dataset_root: Path
) -> None:
    alpha_dir = tenant_dir(shared_dataset_root, "alpha")
    beta_dir = tenant_dir(shared_dataset_root, "beta")
    alpha_file = _write(alpha_dir / "chat.jsonl", [DIALOG_ROW])
    top_level = _write(shared_dataset_root / "everyone.jsonl", [DIALOG_ROW])
    beta_dir.mkdir()
    (beta_dir / "borrowed.jsonl").symlink_to(alpha_file)
    columns = {"dialog": "dialog"}

    def create(uuid: str, where: Path | str, headers: dict[str, str]) -> Any:
        body = {"uuid": uuid, "dataset": _dataset(where, columns)}
        return client.post("/datasets/create", json=body, headers=headers)

    taken = _message(create("c", alpha_file, BETA))
    assert _message(create("c", alpha_dir / "no-such.jsonl", BETA)) == taken
    assert "outside the allowed directories" in taken and str(beta_dir) in taken
    assert str(alpha_dir) not in taken
    for where in (
        beta_dir / "borrowed.jsonl",  # a link from beta's directory into alpha's
        f"file://{beta_dir}/../{alpha_dir.name}/chat.jsonl",
        top_level,
    ):
        assert _message(create("c", where, BETA)) == taken
    assert "outside the allowed directories" in _message(create("c", top_level, ALPHA))
    # A fine-tuning request names its datasets inline: the same rule holds there.
    sft = _sft("s-1", alpha_file)
    assert "outside the allowed" in _message(client.post(SFT_PATH, json=sft, headers=BETA))
    assert _rows(database, Dataset) == [] and _rows(database, Job) == []
    assert launcher.submitted == []

    assert create("c", alpha_file, ALPHA).status_code == 200
    mine = client.post(SFT_PATH, json=sft, headers=ALPHA)
    assert mine.status_code == 200, mine.text
    assert client.get("/datasets/get", params={"dataset_id": "c"}, headers=BETA).status_code == 404
