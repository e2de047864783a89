"""Artifacts in object storage end to end, on a real S3 protocol server (moto, loopback):
a one-step `full` SFT job runs on Ray Train with `CORRAL_STORAGE_URI=s3://…`, so its
checkpoint, its TensorBoard files and Ray Train's run state land in the bucket; the
artifacts route gives a presigned URL a client fetches without credentials; the
checkpoint, registered by that URL, is served by a replica that downloads it from S3 and
answers with its weights; and DPO accepts the same URL (mapped back to the stored URI),
for its tenant only."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from corral.api.common import Message
from corral.config import Settings
from corral.demo import TEACH_QUESTION, greedy_chat, teaching_dialogs
from corral.llama3 import format_chat
from corral.storage import Storage
from corral.store.db import Database
from corral.store.jobs import JobStore
from corral.tenancy import job_key, tenant_dir, tenant_slug
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from serve_apps.engines.transformers_engine import TransformersEngine, TransformersEngineConfig
from tests.api.conftest import ALPHA, API_KEYS, BETA, training_app
from tests.api.training_requests import ONE_STEP, lora_sft_request
from tests.job_api import JobApi

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVED_NAME = "llama3_8b_chat"
MAX_TOKENS = 8
JOB_TIMEOUT_S = 600.0


@pytest.fixture
def s3_settings(
    tmp_path: Path, shared_dataset_root: Path, s3_server: str, s3_bucket: str
) -> Settings:
    return Settings(
        home=tmp_path / "home",
        api_keys=API_KEYS,
        dataset_roots=str(shared_dataset_root),
        storage_uri=f"s3://{s3_bucket}/corral",
        storage_s3_endpoint=s3_server,
        model_cache_dir=tmp_path / "model-cache",
    )


@pytest.fixture
def client(
    s3_settings: Settings,
    sqlite_database: Database,
    ray_jobs_url: str,
    serve_instance: None,
    demo_model_dir: Path,
    job_api_for: Callable[..., JobApi],
) -> Iterator[TestClient]:
    launcher = job_api_for(sqlite_database).launcher(ray_jobs_url)
    app = training_app(s3_settings, sqlite_database, model_dir=demo_model_dir, launcher=launcher)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.headers.update(ALPHA)
        yield test_client
        test_client.delete("/models/delete", params={"model": SERVED_NAME})


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    return response.json() if response.content else None


def _finished(client: TestClient, job_uuid: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job: dict[str, Any] = _ok(client.get("/post_training/job", params={"job_uuid": job_uuid}))
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, f"job {job_uuid} still {job['status']}"
        time.sleep(0.5)


def _dataset(root: Path, name: str, rows: list[dict[str, Any]], columns: dict[str, str]) -> Any:
    directory = tenant_dir(root, "alpha")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return {"columns": columns, "content_url": (directory / name).as_uri(), "metadata": {}}


def _local_answer(model_dir: Path, question: str) -> str:
    engine = TransformersEngine(TransformersEngineConfig(model_dir=model_dir, device="cpu"))
    prompt = format_chat([Message(role="user", content=question, tool_calls=[], tool_responses=[])])
    request = GenerationRequest(prompt=prompt, sampling=SamplingOptions(max_tokens=MAX_TOKENS))
    return engine.generate([request])[0].text


def test_a_job_on_s3_is_listed_served_and_preference_tuned_from_its_url(
    client: TestClient,
    s3_settings: Settings,
    sqlite_database: Database,
    dataset_root: Path,
    demo_model_dir: Path,
    tmp_path: Path,
) -> None:
    storage = Storage.from_settings(s3_settings)
    stamp = time.monotonic_ns()
    sft_uuid, dpo_uuid = f"s3-full-{stamp}", f"s3-dpo-{stamp}"
    teach = _dataset(
        dataset_root,
        "teach.jsonl",
        [{"dialog": d} for d in teaching_dialogs()],
        {"dialog": "dialog"},
    )
    sft = lora_sft_request(sft_uuid, teach)
    sft["algorithm"] = "full"
    sft["logger_config"] = {"tensorboard": True}
    sft["optimizer_config"] |= {"lr": 5e-2, "lr_min": 5e-3}
    _ok(client.post("/post_training/supervised_fine_tune/", json=sft))
    job = _finished(client, sft_uuid)
    assert job["status"] == "completed", job

    # The checkpoint and Ray Train's run state are in the bucket, in the tenant's part.
    job_uri = storage.job_uri("alpha", sft_uuid)
    with sqlite_database.transaction() as session:
        [row] = JobStore(session).checkpoints(job_key("alpha", sft_uuid))
        stored = row.path
    assert stored == f"{job_uri}/checkpoints/iter-1"
    assert storage.is_file(f"{stored}/model.safetensors")
    assert storage.is_dir(f"{job_uri}/ray")
    assert not (Path(s3_settings.checkpoints_dir) / tenant_slug("alpha")).exists()
    # TensorBoard's files went beside the checkpoints, and the job says where.
    events = httpx.get(job["tensorboard_url"])
    assert events.status_code == 200
    assert f"{stored.split('/', 3)[3].removesuffix('checkpoints/iter-1')}tensorboard/" in (
        events.text
    )
    assert "events.out.tfevents" in events.text

    # The spec's artifacts: a presigned URL that lists the checkpoint's files to anyone.
    artifacts = _ok(client.get("/post_training/job/artifacts", params={"job_uuid": sft_uuid}))
    [checkpoint] = artifacts["checkpoints"]
    url = checkpoint["path"]
    assert url.startswith("http://127.0.0.1:") and "X-Amz-Signature" in url
    listing = httpx.get(url)
    assert listing.status_code == 200
    assert f"<Key>{stored.split('/', 3)[3]}/model.safetensors</Key>" in listing.text

    # Registered by that URL, a replica downloads the checkpoint and serves its weights.
    register = {"name": SERVED_NAME, "checkpoint_dir": url, "source_job_uuid": sft_uuid}
    info = _ok(client.post("/models/register", json=register))
    assert info["checkpoint_dir"] == stored
    served = _ok(
        client.post(
            "/inference/chat_completion",
            json=greedy_chat(SERVED_NAME, TEACH_QUESTION, max_tokens=MAX_TOKENS),
        )
    )
    downloaded = tmp_path / "downloaded"
    storage.download_dir(stored, downloaded)
    tuned = _local_answer(downloaded, TEACH_QUESTION)
    assert tuned != _local_answer(demo_model_dir, TEACH_QUESTION)
    assert served["content"] == tuned
    assert any(p.name.startswith("iter-1-") for p in s3_settings.model_cache_dir.iterdir())

    # DPO starts from the URL the artifacts gave, for this tenant only.
    prefs = _dataset(
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
    dpo = {
        "job_uuid": dpo_uuid,
        "finetuned_model": url,
        "dataset": prefs,
        "validation_dataset": prefs,
        "algorithm": "dpo",
        "algorithm_config": {"reward_scale": 0.1, "reward_clip": 0, "epsilon": 0, "gamma": 0},
        "optimizer_config": sft["optimizer_config"],
        "training_config": ONE_STEP,
        "hyperparam_search_config": {},
        "logger_config": {},
    }
    refused = client.post("/post_training/preference_optimize/", json=dpo, headers=BETA)
    assert refused.status_code == 422, refused.text
    assert "own jobs" in refused.text
    _ok(client.post("/post_training/preference_optimize/", json=dpo))
    with sqlite_database.transaction() as session:
        launch = JobStore(session).get(dpo_uuid, tenant="alpha").launch or {}
    assert launch["model_dir"] == stored
    assert launch["output_uri"] == storage.job_uri("alpha", dpo_uuid)
    # Its run is not needed here: the recipes' side of a model in S3 is tested on its own.
    _ok(client.post("/post_training/job/cancel", json={"job_uuid": dpo_uuid}))
