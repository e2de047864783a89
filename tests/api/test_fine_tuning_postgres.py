"""The production path of fine-tuning, on PostgreSQL: a `full` SFT job submitted over HTTP
runs as a Ray job (Ray Jobs API, Ray Train, two workers) that reports to PostgreSQL; its
checkpoint, read from the artifacts route, is registered through the models API (the
registry's rows on PostgreSQL too), served by Serve with the real engine, and answers
with the weights it saved; a DPO job over HTTP from that checkpoint completes as well.

Every other Ray test runs on SQLite; this one is what a deployment runs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from corral.api.common import Message
from corral.config import Settings
from corral.demo import TEACH_QUESTION, greedy_chat, teaching_dialogs, teaching_request
from corral.llama3 import format_chat
from corral.store.db import Database
from corral.tenancy import tenant_dir
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from serve_apps.engines.transformers_engine import TransformersEngine, TransformersEngineConfig
from tests.api.conftest import ALPHA, training_app
from tests.api.training_requests import ONE_STEP
from tests.job_api import JobApi

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SFT_PATH = "/post_training/supervised_fine_tune/"
DPO_PATH = "/post_training/preference_optimize/"
SERVED_NAME = "llama3_8b_chat"
MAX_TOKENS = 12
JOB_TIMEOUT_S = 600.0


@pytest.fixture
def client(
    settings: Settings,
    database: Database,
    ray_jobs_url: str,
    serve_instance: None,
    demo_model_dir: Path,
    job_api_for: Callable[..., JobApi],
) -> Iterator[TestClient]:
    launcher = job_api_for(database).launcher(ray_jobs_url)
    app = training_app(settings, database, model_dir=demo_model_dir, launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.headers.update(ALPHA)
        yield test_client
        # Stop serving what the test registered (the session's Serve outlives the test).
        test_client.delete("/models/delete", params={"model": SERVED_NAME})


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    return response.json() if response.content else None


def _finished(client: TestClient, job_uuid: str) -> dict[str, Any]:
    """The job's summary once it is terminal, polled against a bounded deadline."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job: dict[str, Any] = _ok(client.get("/post_training/job", params={"job_uuid": job_uuid}))
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, f"job {job_uuid} still {job['status']}"
        time.sleep(0.5)


def _last_checkpoint(client: TestClient, job_uuid: str) -> Path:
    artifacts = _ok(client.get("/post_training/job/artifacts", params={"job_uuid": job_uuid}))
    assert artifacts["checkpoints"], artifacts
    return Path(unquote(urlsplit(artifacts["checkpoints"][-1]["path"]).path))


def _write_dataset(
    root: Path, name: str, rows: list[dict[str, Any]], columns: dict[str, str]
) -> dict[str, Any]:
    # A file under the tenant's own directory of the dataset root.
    directory = tenant_dir(root, "alpha")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"columns": columns, "content_url": path.as_uri(), "metadata": {}}


def _local_answer(model_dir: Path, question: str) -> str:
    """What the weights in `model_dir` answer, greedily, run here without Serve."""
    engine = TransformersEngine(TransformersEngineConfig(model_dir=model_dir, device="cpu"))
    prompt = format_chat([Message(role="user", content=question, tool_calls=[], tool_responses=[])])
    request = GenerationRequest(prompt=prompt, sampling=SamplingOptions(max_tokens=MAX_TOKENS))
    return engine.generate([request])[0].text


def _dpo_request(job_uuid: str, model_dir: Path, dataset: dict[str, Any]) -> dict[str, Any]:
    return {
        "job_uuid": job_uuid,
        "finetuned_model": model_dir.as_uri(),
        "dataset": dataset,
        "validation_dataset": dataset,
        "algorithm": "dpo",
        "algorithm_config": {"reward_scale": 0.1, "reward_clip": 0, "epsilon": 0, "gamma": 0},
        "optimizer_config": {
            "optimizer_type": "adamw",
            "lr": 1e-4,
            "lr_min": 1e-5,
            "weight_decay": 0.0,
        },
        "training_config": ONE_STEP,
        "hyperparam_search_config": {},
        "logger_config": {},
    }


@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_full_sft_on_postgres_is_registered_served_and_then_preference_tuned(
    client: TestClient, database: Database, dataset_root: Path, demo_model_dir: Path
) -> None:
    assert database.url.startswith("postgresql")
    stamp = time.monotonic_ns()
    sft_uuid, dpo_uuid = f"pg-full-{stamp}", f"pg-dpo-{stamp}"

    teach = _write_dataset(
        dataset_root,
        "teach.jsonl",
        [{"dialog": d} for d in teaching_dialogs()],
        {"dialog": "dialog"},
    )
    sft = teaching_request(sft_uuid, teach, teach)
    sft["algorithm"] = "full"  # the spec still sends a LoRA-shaped config with it
    sft["optimizer_config"] |= {"lr": 1e-3, "lr_min": 1e-4}
    sft["training_config"] |= {"n_epochs": 1, "n_iters": 3}
    _ok(client.post(SFT_PATH, json=sft))

    job = _finished(client, sft_uuid)
    assert job["status"] == "completed", job
    status = _ok(client.get("/post_training/job/status", params={"job_uuid": sft_uuid}))
    assert status["resources_allocated"]["num_workers"] == 2
    checkpoint = _last_checkpoint(client, sft_uuid)
    assert (checkpoint / "model.safetensors").is_file()  # whole weights, no adapter
    assert not (checkpoint / "adapter_config.json").exists()

    # DPO from the full checkpoint runs on Ray while the checkpoint is being served.
    prefs = _write_dataset(
        dataset_root,
        "prefs.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": TEACH_QUESTION}],
                "chosen": "Corral trains models on Ray.",
                "rejected": "I do not know.",
            }
        ],
        {"prompt": "dialog", "chosen": "text", "rejected": "text"},
    )
    _ok(client.post(DPO_PATH, json=_dpo_request(dpo_uuid, checkpoint, prefs)))

    register = {
        "name": SERVED_NAME,
        "checkpoint_dir": str(checkpoint),
        "source_job_uuid": sft_uuid,
        "max_batch_size": 2,
    }
    _ok(client.post("/models/register", json=register))
    listed = {m["name"]: m for m in _ok(client.get("/models"))["data"]}
    assert listed[SERVED_NAME]["source"] == "registered"
    assert listed[SERVED_NAME]["checkpoint_dir"] == str(checkpoint)

    served = _ok(
        client.post(
            "/inference/chat_completion",
            json=greedy_chat(SERVED_NAME, TEACH_QUESTION, max_tokens=MAX_TOKENS),
        )
    )
    tuned = _local_answer(checkpoint, TEACH_QUESTION)
    assert tuned != _local_answer(
        demo_model_dir, TEACH_QUESTION
    )  # training moved the weights far enough to change the answer ...
    assert served["content"] == tuned  # ... and Serve answers with the saved weights

    dpo = _finished(client, dpo_uuid)
    assert dpo["status"] == "completed", dpo
    dpo_checkpoint = _last_checkpoint(client, dpo_uuid)
    assert (dpo_checkpoint / "config.json").is_file()
    logs = _ok(client.get("/post_training/job/logs", params={"job_uuid": dpo_uuid}))["log_lines"]
    assert any("loss" in line for line in logs), logs
