"""Adapters riding on a shared base (engine vllm, max_adapters): registered, resolved and
answered through the base's one app, on a real local Ray Serve and a real SQLite store,
with the scripted engine standing in for vLLM (it answers `via-<adapter dir>` first, so
each answer says which adapter the replica was handed). The real engine serving three
adapters from one replica is tests/serve_apps/test_vllm_adapters.py."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path

import pytest
from ray import serve
from sqlalchemy import select

from corral.api.models import RegisterModelRequest
from corral.errors import Conflict, InvalidRequest, NotFound
from corral.services.model_calls import generate
from corral.services.models import build_model_service
from corral.serving.catalog import ModelRoots, ModelSpec, file_app_name
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.store.tables import ServedModel
from corral.tenancy import job_checkpoint_dir
from serve_apps.engines.protocol import GenerationRequest, SamplingOptions
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine

pytestmark = pytest.mark.integration
REPLY = "scripted answer"


def adapter_dir(home: Path, tenant: str, job: str, rank: int = 8, **config: object) -> Path:
    directory = job_checkpoint_dir(home / "checkpoints", tenant, job) / "adapter"
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16} | config)
    )
    return directory


def ask(registry: object, tenant: str, model: str) -> str:
    handle = registry.resolver.handle_for(tenant=tenant, model=model)  # type: ignore[attr-defined]
    request = GenerationRequest(prompt="hi", sampling=SamplingOptions(max_tokens=8))
    return asyncio.run(generate(handle, request)).text


def test_adapters_ride_on_the_shared_base_per_tenant(
    serve_instance: None, sqlite_database: Database, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    token = uuid.uuid4().hex[:8]
    base_dir = home / "models" / "base"
    base_dir.mkdir(parents=True)
    (base_dir / "config.json").write_text("{}")
    base = ModelSpec(
        name=f"base-{token}",
        checkpoint_dir=base_dir,
        engine="vllm",
        max_adapters=4,
        max_adapter_rank=8,
        cpus_per_replica=0.25,
    )
    registry = build_model_service(
        database=sqlite_database,
        # The scripted engine runs in this env: it is the "vLLM env" of the test.
        deployer=ServeDeployer(deploy_timeout_s=60, vllm_python=Path(sys.executable)),
        file_models=[base],
        model_roots=ModelRoots(shared=(home / "models",), checkpoints=home / "checkpoints"),
        engine_factory=lambda config: scripted_engine(ScriptedEngineConfig(REPLY), config),
    )
    try:
        registry.start()
        apps = set(serve.status().applications)
        mine = {t: adapter_dir(home, t, f"job-{t}") for t in ("alpha", "beta")}
        for tenant, directory in mine.items():
            request = RegisterModelRequest(
                name="mine", checkpoint_dir=str(base_dir), adapter_dir=str(directory)
            )
            info = registry.register(tenant=tenant, request=request)
            assert (info.base_model, info.status, info.replicas) == (base.name, "RUNNING", 1)
            assert (info.engine, info.max_adapters) == ("vllm", 4)  # the base's options
            # The same request again is the same registration.
            assert registry.register(tenant=tenant, request=request) == info
        assert set(serve.status().applications) == apps  # nothing was deployed

        # Both tenants' "mine" run on the one base app, each with its own adapter.
        assert ask(registry, "alpha", "mine") == f"via-{mine['alpha'].name} {REPLY}"
        assert ask(registry, "alpha", base.name) == REPLY
        with sqlite_database.transaction() as session:
            ids = dict(session.execute(select(ServedModel.tenant, ServedModel.adapter_id)).all())
        assert len(set(ids.values())) == 2 and None not in ids.values()

        # Another tenant neither sees nor uses them.
        with pytest.raises(NotFound):
            ask(registry, "gamma", "mine")
        assert [m.name for m in registry.list("gamma")] == [base.name]
        listed = {m.name: m for m in registry.list("beta")}
        assert listed["mine"].base_model == base.name
        assert listed["mine"].adapter_dir == str(mine["beta"])

        # Its replicas are the base's: scaling it names the base.
        riding = f"riding on the replicas of the base model '{base.name}'"
        with pytest.raises(Conflict, match=riding):
            registry.scale(tenant="alpha", model="mine", replicas=2)

        # Refused before anything is stored: a rank above the base's, replica options
        # of its own, DoRA.
        for job, fields, message in [
            ("rank", {"rank": 16}, "rank 16 is above the base's max_adapter_rank 8"),
            ("dora", {"use_dora": True}, "DoRA"),
        ]:
            rank = int(fields.pop("rank", 8))  # type: ignore[call-overload]
            bad = adapter_dir(home, "alpha", f"job-{job}", rank=rank, **fields)
            with pytest.raises(InvalidRequest, match=message):
                registry.register(
                    tenant="alpha",
                    request=RegisterModelRequest(
                        name=job, checkpoint_dir=str(base_dir), adapter_dir=str(bad)
                    ),
                )
        with pytest.raises(InvalidRequest, match="leave out max_replicas"):
            registry.register(
                tenant="alpha",
                request=RegisterModelRequest(
                    name="own",
                    checkpoint_dir=str(base_dir),
                    adapter_dir=str(mine["alpha"]),
                    max_replicas=3,
                ),
            )

        # Deleting one tenant's adapter leaves the other's; the name may be registered
        # again, as a new adapter (a new id: the replicas never mistake it for the old).
        registry.unregister(tenant="alpha", model="mine")
        with pytest.raises(NotFound):
            ask(registry, "alpha", "mine")
        assert ask(registry, "beta", "mine") == f"via-{mine['beta'].name} {REPLY}"
        registry.register(
            tenant="alpha",
            request=RegisterModelRequest(
                name="mine", checkpoint_dir=str(base_dir), adapter_dir=str(mine["alpha"])
            ),
        )
        with sqlite_database.transaction() as session:
            again = session.scalars(
                select(ServedModel.adapter_id).where(ServedModel.tenant == "alpha")
            ).one()
        assert again not in ids.values()

        # A restart deploys the base again, and no app for the adapters.
        registry.restore()
        assert set(serve.status().applications) == apps
        assert ask(registry, "alpha", "mine") == f"via-{mine['alpha'].name} {REPLY}"
    finally:
        serve.delete(file_app_name(base.name))
