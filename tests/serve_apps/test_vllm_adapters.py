"""Three LoRA adapters, each trained for a few seconds to answer one question its own
way, registered by two tenants over one vLLM base and served by its one replica: each
answers as its own training taught it. The path is the control plane's below the routes
(the models service registers them, the resolver's handle carries each adapter, the
replica's vLLM engine loads it), on a real local Ray Serve, the replica in the vLLM env.

The replica keeps two adapters loaded and gives a tenant one of them, so the two
adapters of one tenant take turns in one slot while the other tenant's stays loaded."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import pytest
from ray import serve

from corral.api.models import RegisterModelRequest
from corral.services.model_calls import generate
from corral.services.models import ModelService, build_model_service
from corral.serving.catalog import ModelRoots, ModelSpec, file_app_name
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.tenancy import job_checkpoint_dir
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from tests.serve_apps.adapter_training import QUESTION, TAUGHT, train_adapter
from tests.serve_apps.answering_model import PROMPT
from tests.serve_apps.vllm_env import vllm_python_or_skip

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (tenant, the tenant's own name for it, which sentence its job taught)
ADAPTERS = (("alpha", "mine", 0), ("alpha", "other", 1), ("beta", "mine", 2))


def ask(registry: ModelService, tenant: str, model: str, max_tokens: int = 32) -> tuple[str, float]:
    handle = registry.resolver.handle_for(tenant=tenant, model=model)
    request = GenerationRequest(
        prompt=PROMPT.format(QUESTION), sampling=SamplingOptions(max_tokens=max_tokens)
    )
    started = time.perf_counter()
    result = asyncio.run(generate(handle, request))
    return result.text, time.perf_counter() - started


def test_three_adapters_on_one_vllm_replica_answer_as_taught(
    serve_instance: None, sqlite_database: Database, tmp_path: Path, answering_model_dir: Path
) -> None:
    python = vllm_python_or_skip()
    base_dir = answering_model_dir
    checkpoints = tmp_path / "checkpoints"
    started = time.monotonic()
    dirs = [
        train_adapter(
            base_dir,
            job_checkpoint_dir(checkpoints, tenant, f"job-{index}") / "adapter",
            TAUGHT[index],
            seed=index,
        )
        for tenant, _, index in ADAPTERS
    ]
    print(f"3 adapters trained in {time.monotonic() - started:.1f} s")
    base = ModelSpec(
        name="vllm-adapters-base",
        checkpoint_dir=base_dir,
        engine="vllm",
        device="cpu",
        cpus_per_replica=0.5,
        max_adapters=2,
        max_adapters_per_tenant=1,
        max_adapter_rank=8,
    )
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(deploy_timeout_s=600, vllm_python=python),
        file_models=[base],
        model_roots=ModelRoots(shared=(base_dir.parent,), checkpoints=checkpoints),
    )
    try:
        registry.start()
        apps = set(serve.status().applications)
        for (tenant, name, _), directory in zip(ADAPTERS, dirs, strict=True):
            info = registry.register(
                tenant=tenant,
                request=RegisterModelRequest(
                    name=name, checkpoint_dir=str(base_dir), adapter_dir=str(directory)
                ),
            )
            assert info.base_model == base.name
        assert set(serve.status().applications) == apps  # one app, one replica, for all

        base_answer, _ = ask(registry, "alpha", base.name)
        assert base_answer not in TAUGHT
        latencies: dict[str, list[float]] = {"base": [], "adapter": []}
        for _ in range(2):  # the second round reloads alpha's adapters, evicted by turns
            for tenant, name, index in ADAPTERS:
                answer, _ = ask(registry, tenant, name)
                assert answer == TAUGHT[index], (tenant, name)
        stats = registry.deployer.handle(file_app_name(base.name)).stats.remote().result()
        resident = stats["engine"]["adapters"]
        # Two slots, one per tenant: beta's stayed loaded through alpha's turns.
        assert sorted(resident.values()) == ["alpha", "beta"]
        loads = stats["engine"]["adapter_load_s"]
        assert len(loads) == 5  # alpha's two loaded twice each, beta's once

        for _ in range(5):  # a loaded adapter against the base: one at a time, 4 tokens
            latencies["adapter"].append(ask(registry, "beta", "mine", max_tokens=4)[1])
            latencies["base"].append(ask(registry, "beta", base.name, max_tokens=4)[1])
        print(
            f"adapter load p50 {statistics.median(loads) * 1000:.0f} ms "
            f"(max {max(loads) * 1000:.0f} ms); request p50 with a loaded adapter "
            f"{statistics.median(latencies['adapter']) * 1000:.0f} ms, base "
            f"{statistics.median(latencies['base']) * 1000:.0f} ms"
        )
    finally:
        serve.delete(file_app_name(base.name))
