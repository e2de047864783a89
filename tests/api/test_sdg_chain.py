"""The whole loop through the API on a real local Ray cluster: a generation job
(`/synthetic_data_generation/jobs`, run by Ray Jobs: the demo LLM's Serve app generates,
the demo reward model's Serve app scores) writes and registers a DPO dataset; a DPO job
(`/post_training/preference_optimize`) trains the demo policy on that very dataset, as
the API gives it back; and the trained policy's mean reward on held-out prompts, fixed
seeds, beats the starting policy's by `tests/sdg_loop.SAFE_MARGIN` (the settings and the
figures measured on the demo models are in tests/sdg_loop.py)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest

from corral.app import create_app, fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher
from corral.services.models import build_model_service
from corral.serving.catalog import ModelSpec, file_app_name, model_roots
from corral.serving.deployer import ServeDeployer
from corral.storage import Storage
from corral.store.db import Database
from tests.api.conftest import ALPHA, API_KEYS
from tests.api.live_server import live_server
from tests.job_api import JobApi
from tests.sdg_loop import (
    CHAIN,
    HELD_OUT_PROMPTS,
    HELD_OUT_SEEDS,
    SAFE_MARGIN,
    TRAINING_PROMPTS,
    mean_reward,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
JOB_TIMEOUT_S = 400.0
MODELS = ("sdg-chain-policy", "sdg-chain-reward")


@pytest.fixture
def settings(tmp_path: Path, demo_model_dir: Path) -> Settings:
    settings = Settings(home=tmp_path / "home", api_keys=API_KEYS, train_workers=CHAIN.workers)
    # DPO starts from a model in the shared model root, where any tenant may name one.
    shutil.copytree(demo_model_dir, settings.home / "models" / "demo")
    return settings


@pytest.fixture
def api(
    settings: Settings,
    sqlite_database: Database,
    ray_jobs_url: str,
    serve_instance: None,
    demo_model_dir: Path,
    demo_reward_model_dir: Path,
    job_api_for: Callable[..., JobApi],
) -> Iterator[httpx.Client]:
    """A live API server over the session's Ray: the demo policy as `llama3_8b_chat` and
    the demo reward model as `llama3_405b_reward`, both deployed before it serves."""
    storage = Storage.from_settings(settings)
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(storage=storage.options, model_cache_dir=settings.model_cache_dir),
        file_models=[
            ModelSpec(
                name=MODELS[0],
                aliases=["llama3_8b_chat"],
                checkpoint_dir=demo_model_dir,
                cpus_per_replica=0.25,
                max_batch_size=16,
            ),
            ModelSpec(
                name=MODELS[1],
                aliases=["llama3_405b_reward"],
                kind="reward",
                checkpoint_dir=demo_reward_model_dir,
                cpus_per_replica=0.25,
                max_batch_size=16,
            ),
        ],
        model_roots=model_roots(settings),
        storage=storage,
    )
    registry.start()
    app = create_app(
        settings,
        database=sqlite_database,
        fetcher=ContentFetcher(fetch_policy(settings)),
        models=registry,
        launcher=job_api_for(sqlite_database).launcher(ray_jobs_url),
    )
    try:
        with live_server(app) as url, httpx.Client(base_url=url, headers=ALPHA, timeout=60) as c:
            yield c
    finally:
        from ray import serve

        for name in MODELS:
            serve.delete(file_app_name(name))


def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, f"{response.request.url}: {response.text}"
    return response.json() if response.content else None


def _finished(api: httpx.Client, job_uuid: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job: dict[str, Any] = _ok(api.get(f"/jobs/{job_uuid}"))
        if job["status"] in {"completed", "failed", "cancelled"}:
            return job
        assert time.monotonic() < deadline, f"job {job_uuid} still {job['status']}"
        time.sleep(1)


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}


def test_a_generated_dpo_dataset_trains_a_policy_the_reward_model_prefers(
    api: httpx.Client, settings: Settings, demo_model_dir: Path, demo_reward_model_dir: Path
) -> None:
    stamp = time.monotonic_ns()
    sdg_uuid, dpo_uuid = f"sdg-chain-{stamp}", f"dpo-chain-{stamp}"
    started = time.monotonic()
    _ok(
        api.post(
            "/synthetic_data_generation/jobs",
            json={
                "job_uuid": sdg_uuid,
                "prompts": [_user(prompt) for prompt in TRAINING_PROMPTS],
                "filtering_function": "none",
                "reward_scoring": {
                    "generation": {
                        "num_candidates": CHAIN.candidates,
                        "max_tokens": CHAIN.max_tokens,
                        "temperature": CHAIN.temperature,
                        "top_p": 1.0,
                        "seed": 0,
                    }
                },
                "output": {"format": "dpo"},
            },
        )
    )
    generation = _finished(api, sdg_uuid)
    generation_s = time.monotonic() - started
    assert generation["status"] == "completed", _ok(api.get(f"/jobs/{sdg_uuid}/logs"))
    metrics = _ok(api.get(f"/jobs/{sdg_uuid}/metrics"))["data"]
    assert metrics[-1]["values"]["prompts_done"] == len(TRAINING_PROMPTS)

    dataset = _ok(api.get("/datasets/get", params={"dataset_id": sdg_uuid}))
    assert dataset["columns"] == {"prompt": "dialog", "chosen": "text", "rejected": "text"}
    started = time.monotonic()
    _ok(
        api.post(
            "/post_training/preference_optimize/",
            json={
                "job_uuid": dpo_uuid,
                "finetuned_model": (settings.home / "models" / "demo").as_uri(),
                "dataset": dataset,
                "validation_dataset": dataset,
                "algorithm": "dpo",
                "algorithm_config": {
                    "reward_scale": CHAIN.beta,
                    "reward_clip": 0,
                    "epsilon": 0,
                    "gamma": 0,
                },
                "optimizer_config": {
                    "optimizer_type": "adamw",
                    "lr": CHAIN.lr,
                    "lr_min": CHAIN.lr_min,
                    "weight_decay": 0.0,
                },
                "training_config": {
                    "n_epochs": CHAIN.n_epochs,
                    "batch_size": CHAIN.batch_size,
                    "shuffle": False,
                    "n_iters": 1000,
                    "enable_activation_checkpointing": False,
                    "memory_efficient_fsdp_wrap": False,
                    "fsdp_cpu_offload": False,
                },
                "hyperparam_search_config": {},
                "logger_config": {},
            },
        )
    )
    training = _finished(api, dpo_uuid)
    training_s = time.monotonic() - started
    assert training["status"] == "completed", _ok(api.get(f"/jobs/{dpo_uuid}/logs"))
    artifacts = _ok(api.get("/post_training/job/artifacts", params={"job_uuid": dpo_uuid}))
    trained = Path(unquote(urlsplit(artifacts["checkpoints"][-1]["path"]).path))

    held_out = {
        "seeds": HELD_OUT_SEEDS,
        "max_tokens": CHAIN.max_tokens,
        "temperature": CHAIN.temperature,
    }
    before = mean_reward(demo_model_dir, demo_reward_model_dir, HELD_OUT_PROMPTS, **held_out)
    after = mean_reward(trained, demo_reward_model_dir, HELD_OUT_PROMPTS, **held_out)
    print(  # the figures the report quotes (pytest -s)
        f"sdg chain: generation job {generation_s:.1f} s, dpo job {training_s:.1f} s, "
        f"{dataset['metadata']}, mean held-out reward {before:.4f} -> {after:.4f}"
    )
    assert after > before + SAFE_MARGIN, (before, after)
