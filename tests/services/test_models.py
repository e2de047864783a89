"""The model registry on a real local Ray Serve and a real (SQLite) database, with the
scripted engine for speed, and once with the real demo model through the embedded default.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from ray import serve
from ray.serve.context import _get_global_client
from sqlalchemy import select

from corral.api.models import RegisterModelRequest
from corral.config import Settings
from corral.demo_model import build_demo_model
from corral.demo_reward import build_demo_reward_model
from corral.errors import Conflict, Forbidden, InvalidRequest, NotFound, QuotaExceeded
from corral.services.models import ModelService, TenantQuota, build_model_service
from corral.serving.catalog import (
    ModelRoots,
    ModelSpec,
    ServedName,
    file_app_name,
    load_catalog,
    tenant_app_name,
)
from corral.serving.deployer import ModelDeployError, ModelUnavailable, ServeDeployer
from corral.store.db import Database
from corral.store.tables import FileModelScale, ServedModel
from corral.tenancy import job_checkpoint_dir, tenant_dir, tenant_slug
from serve_apps.engines.protocol import (
    ChatMessage,
    GenerationRequest,
    SamplingOptions,
    ScoringRequest,
)
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.llm import DEPLOYMENT_NAME
from serve_apps.options import ReplicaOptions
from tests.conftest import EmbeddingApp, add_registered_model_row
from tests.serve_apps.probe_engine import Records, options_engine, probe_engine

REPLY = "one two three four"
REQUEST = GenerationRequest(prompt="hi", sampling=SamplingOptions())


def scripted(seconds_per_step: float = 0.0) -> Any:
    return partial(scripted_engine, ScriptedEngineConfig(REPLY, seconds_per_step))


def roots(home: Path) -> ModelRoots:
    return ModelRoots(shared=(home / "models",), checkpoints=home / "checkpoints")


def own_checkpoint(home: Path, tenant: str, job: str, *parts: str) -> Path:
    """A directory in `tenant`'s own job checkpoints, made and holding config.json."""
    return make_checkpoint(job_checkpoint_dir(home / "checkpoints", tenant, job).joinpath(*parts))


def make_checkpoint(directory: Path, marker: str = "config.json") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / marker).write_text("{}")
    return directory


def running_replica_ids(app_name: str) -> set[str]:
    # Replica ids are only in Serve's detailed status; the test reads them to prove
    # that scaling did not restart a replica.
    details = _get_global_client().get_serve_details()
    replicas = details["applications"][app_name]["deployments"][DEPLOYMENT_NAME]["replicas"]
    return {r["replica_id"] for r in replicas if r["state"] == "RUNNING"}


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.25)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def token() -> Iterator[str]:
    """A word unique to the test, in every app name it creates (tenants and file
    models), so apps never meet across tests; they are deleted afterwards."""
    token = uuid.uuid4().hex[:8]
    yield token
    for name in list(serve.status().applications):
        if token in name:
            serve.delete(name, _blocking=False)  # the next test need not wait for it


@pytest.fixture
def tenant(token: str) -> str:
    return f"tenant-{token}"


RegistryFactory = Callable[..., ModelService]


@pytest.fixture
def make_registry(sqlite_database: Database, home: Path, token: str) -> RegistryFactory:
    def make(
        *file_models: ModelSpec,
        engine: Any = None,
        deploy_timeout_s: float = 60,
        quota: TenantQuota | None = None,
    ) -> ModelService:
        return build_model_service(
            database=sqlite_database,
            deployer=ServeDeployer(deploy_timeout_s=deploy_timeout_s),
            file_models=list(file_models),
            model_roots=roots(home),
            engine_factory=engine or scripted(),
            registration_defaults=ReplicaOptions(cpus_per_replica=0.25),
            quota=quota,
        )

    return make


def file_model(home: Path, name: str, **fields: Any) -> ModelSpec:
    return ModelSpec(
        name=name,
        checkpoint_dir=make_checkpoint(home / "models" / name),
        cpus_per_replica=0.25,
        **fields,
    )


def rows(database: Database) -> list[tuple[str, str, int, int]]:
    with database.transaction() as session:
        found = session.scalars(select(ServedModel).order_by(ServedModel.name))
        return [
            (r.tenant, r.name, r.options["min_replicas"], r.options["max_replicas"]) for r in found
        ]


def stored_scales(database: Database) -> list[tuple[str, int, int, str]]:
    with database.transaction() as session:
        found = session.scalars(select(FileModelScale).order_by(FileModelScale.name))
        return [(r.name, r.min_replicas, r.max_replicas, r.scaled_by) for r in found]


def add_row(database: Database, tenant: str, name: str) -> None:
    """A registered model's row as another API process would have stored it."""
    add_registered_model_row(database, tenant=tenant, name=name, checkpoint_dir="/w")


def deployment_config(app_name: str) -> dict[str, Any]:
    """The deployment options Serve runs the app with."""
    details = _get_global_client().get_serve_details()
    config: dict[str, Any] = details["applications"][app_name]["deployments"][DEPLOYMENT_NAME][
        "deployment_config"
    ]
    return config


def deployed_bounds(app_name: str) -> tuple[int, int]:
    """The replica bounds Serve runs the app with (not what the registry says)."""
    details = _get_global_client().get_serve_details()
    deployment = details["applications"][app_name]["deployments"][DEPLOYMENT_NAME]
    autoscaling = deployment["deployment_config"]["autoscaling_config"]
    return autoscaling["min_replicas"], autoscaling["max_replicas"]


# ---------------------------------------------------------------- without Ray


def test_register_refuses_bad_directories_and_stores_nothing(
    database: Database, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    registry = build_model_service(
        database=database, deployer=ServeDeployer(), file_models=[], model_roots=roots(home)
    )
    good = own_checkpoint(home, "alpha", "sft-1")
    outside = make_checkpoint(tmp_path / "elsewhere")
    (good.parent / "link").symlink_to(outside)
    no_config = home / "models" / "empty"
    no_config.mkdir(parents=True)
    cases = {
        "relative": ({"checkpoint_dir": "checkpoints/sft-1"}, "absolute path"),
        "dot-dot inside": ({"checkpoint_dir": f"{good}/../sft-1"}, "without '..'"),
        "outside the roots": ({"checkpoint_dir": str(outside)}, "your own jobs"),
        "traversal": ({"checkpoint_dir": f"{home}/checkpoints/../../elsewhere"}, "'..'"),
        "probing outside": ({"checkpoint_dir": f"{tmp_path}/nothing"}, "your own jobs"),
        "symlink out": ({"checkpoint_dir": str(good.parent / "link")}, "your own jobs"),
        "missing": ({"checkpoint_dir": f"{home}/models/nothing"}, "no such directory"),
        "no config.json": ({"checkpoint_dir": str(no_config)}, "no config.json"),
        "a file": ({"checkpoint_dir": str(good / "config.json")}, "not a directory"),
        "adapter without adapter_config.json": (
            {"checkpoint_dir": str(good), "adapter_dir": str(good)},
            "no adapter_config.json",
        ),
        "unknown source job": (
            {"checkpoint_dir": str(good), "source_job_uuid": "no-such-job"},
            "no job",
        ),
    }
    for case, (fields, message) in cases.items():
        request = RegisterModelRequest.model_validate({"name": "m"} | fields)
        with pytest.raises(InvalidRequest, match=message):
            registry.register(tenant="alpha", request=request)
        assert rows(database) == [], case


def test_checkpoints_belong_to_their_tenant_and_shared_directories_to_everyone(
    sqlite_database: Database, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    operator_model = make_checkpoint(tmp_path / "operator" / "base")  # outside every root
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[ModelSpec(name="base", checkpoint_dir=operator_model)],
        model_roots=roots(home),
    )
    alpha_job = own_checkpoint(home, "alpha", "sft-1", "checkpoints", "iter-2")
    alpha_adapter = make_checkpoint(alpha_job.parent / "lora", "adapter_config.json")
    beta_dir = tenant_dir(home / "checkpoints", "beta")
    beta_dir.mkdir(parents=True)
    (beta_dir / "borrowed").symlink_to(alpha_job)  # a link from beta's dir into alpha's
    legacy = make_checkpoint(home / "checkpoints" / "sft-0")  # the old, unpartitioned layout
    shared = make_checkpoint(home / "models" / "shared")

    def check(tenant: str, path: Path, marker: str = "config.json") -> Path:
        return registry.checked_dir(str(path), "checkpoint_dir", marker, tenant=tenant)

    assert check("alpha", alpha_job) == alpha_job.resolve()
    assert check("alpha", alpha_adapter, "adapter_config.json") == alpha_adapter.resolve()
    for tenant in ("alpha", "beta"):
        assert check(tenant, shared) == shared.resolve()
        assert check(tenant, operator_model) == operator_model.resolve()
    with pytest.raises(InvalidRequest, match="your own jobs") as existing:
        check("beta", alpha_job)
    with pytest.raises(InvalidRequest) as missing:
        check("beta", alpha_job.parent / "iter-99")
    # Another tenant's checkpoint reads exactly like a path where nothing is.
    assert existing.value.message == missing.value.message
    assert (
        "alpha" not in existing.value.message and tenant_slug("alpha") not in missing.value.message
    )
    for tenant, path in [
        ("beta", beta_dir / "borrowed"),
        ("beta", alpha_adapter),
        ("alpha", legacy),
        ("beta", legacy),
        ("beta", operator_model / "sub"),  # a file model's directory itself, not below it
    ]:
        with pytest.raises(InvalidRequest, match="your own jobs"):
            check(tenant, path)

    request = RegisterModelRequest(
        name="stolen", checkpoint_dir=str(shared), adapter_dir=str(alpha_adapter)
    )
    with pytest.raises(InvalidRequest, match="adapter_dir must be"):
        registry.register(tenant="beta", request=request)
    assert rows(sqlite_database) == []


def test_a_shared_model_root_may_not_overlap_the_checkpoints(
    sqlite_database: Database, tmp_path: Path
) -> None:
    for shared in (tmp_path, tmp_path / "checkpoints" / "x"):
        with pytest.raises(ValueError, match="partitioned by tenant"):
            build_model_service(
                database=sqlite_database,
                deployer=ServeDeployer(),
                file_models=[],
                model_roots=ModelRoots(shared=(shared,), checkpoints=tmp_path / "checkpoints"),
            )


def test_scale_and_resolve_refuse_what_they_cannot_do(sqlite_database: Database) -> None:
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[],
        model_roots=ModelRoots(shared=()),
    )
    with pytest.raises(NotFound):
        registry.resolve(tenant="alpha", model="nothing")
    with pytest.raises(InvalidRequest, match="either replicas or"):
        registry.scale(tenant="alpha", model="x", replicas=2, min_replicas=1)
    with pytest.raises(InvalidRequest, match="give replicas"):
        registry.scale(tenant="alpha", model="x")
    with pytest.raises(NotFound):
        registry.scale(tenant="alpha", model="x", replicas=2)
    with pytest.raises(NotFound):
        registry.unregister(tenant="alpha", model="x")


def test_lookups_are_cached_briefly_and_fresh_reads_see_other_processes(
    sqlite_database: Database,
) -> None:
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[],
        model_roots=ModelRoots(shared=()),
    )
    with pytest.raises(NotFound):
        registry.resolve(tenant="alpha", model="elsewhere")
    add_row(sqlite_database, "alpha", "elsewhere")  # another API process registers it
    with pytest.raises(NotFound):  # within RESOLVE_CACHE_S
        registry.resolve(tenant="alpha", model="elsewhere")
    resolved = registry.resolve(tenant="alpha", model="elsewhere", fresh=True)
    assert (resolved.source, resolved.app_name) == (
        "registered",
        tenant_app_name("alpha", "elsewhere"),
    )
    assert registry.resolve(tenant="alpha", model="elsewhere") == resolved


def test_a_tenant_may_not_scale_or_delete_a_file_model_and_nothing_is_stored(
    database: Database, tmp_path: Path
) -> None:
    spec = file_model(tmp_path, "shared", aliases=["shared-alias"])
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=[spec],
        model_roots=ModelRoots(shared=()),
    )
    for model in ("shared", "shared-alias"):
        with pytest.raises(Forbidden, match="only an operator key scales it"):
            registry.scale(tenant="alpha", model=model, replicas=2)
        with pytest.raises(Forbidden, match="only an operator"):
            registry.unregister(tenant="alpha", model=model)
    # Refused before anything else: even bounds that could never be valid get a 403.
    with pytest.raises(Forbidden):
        registry.scale(tenant="alpha", model="shared", min_replicas=3, max_replicas=2)
    assert stored_scales(database) == []
    # Nobody deletes a shared model through the API, an operator neither (no Serve call).
    with pytest.raises(InvalidRequest, match="remove it there"):
        registry.unregister(tenant="ops", model="shared-alias", operator=True)


def test_model_names_are_every_name_that_resolves_once_each(
    database: Database, tmp_path: Path
) -> None:
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=[
            file_model(tmp_path, "demo", aliases=["llama3_8b", "llama3_70b"]),
            file_model(tmp_path, "other"),
        ],
        model_roots=ModelRoots(shared=()),
    )
    add_row(database, "alpha", "mine")
    add_row(database, "alpha", "llama3_8b")  # shadows a file model's alias, for alpha only
    add_row(database, "beta", "theirs")
    shared = [ServedName(name, None) for name in ("demo", "llama3_8b", "llama3_70b", "other")]
    alpha = registry.model_names(tenant="alpha")
    assert alpha == [
        ServedName("demo", None),
        ServedName("llama3_70b", None),
        ServedName("other", None),
        ServedName("llama3_8b", "alpha"),
        ServedName("mine", "alpha"),
    ]
    assert registry.model_names(tenant="gamma") == shared
    for served in alpha:  # what is listed is exactly what resolves, to the listed owner
        resolved = registry.resolve(tenant="alpha", model=served.name)
        assert resolved.source == ("file" if served.owner is None else "registered")


# ---------------------------------------------------------------- on Ray Serve


def test_a_kind_or_engine_without_an_app_is_refused_and_stores_nothing(
    sqlite_database: Database, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    # vLLM is served from an env of its own (serve_apps.vllm_env): none here.
    deployer = ServeDeployer(vllm_python=tmp_path / "no-vllm-env" / "bin" / "python")
    registry = build_model_service(
        database=sqlite_database, deployer=deployer, file_models=[], model_roots=roots(home)
    )
    checkpoint = str(own_checkpoint(home, "alpha", "job-1"))
    for fields, message in [
        ({"kind": "classifier", "engine": "vllm"}, "engine: 'vllm' is not available for class"),
        ({"kind": "embedding", "engine": "vllm"}, "engine: vllm runs in its own Python env"),
        ({"kind": "reward", "engine": "vllm"}, "engine: vllm runs in its own Python env"),
        ({"engine": "vllm"}, "engine: vllm runs in its own Python environment"),
    ]:
        request = RegisterModelRequest.model_validate(
            {"name": "m", "checkpoint_dir": checkpoint} | fields
        )
        with pytest.raises(InvalidRequest, match=message):
            registry.register(tenant="alpha", request=request)
    assert rows(sqlite_database) == []


def test_a_tenant_stays_within_its_quota_and_a_refusal_stores_nothing(
    sqlite_database: Database, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[],
        model_roots=roots(home),
        quota=TenantQuota(replicas_per_model=4, gpus_per_model=2, replicas=4, gpus=3),
    )
    add_row(sqlite_database, "alpha", "first")  # 1 replica, no GPU
    for name in ("b1", "b2", "b3", "b4"):  # another tenant's: not counted for alpha
        add_row(sqlite_database, "beta", name)
    stored = rows(sqlite_database)
    checkpoint = str(own_checkpoint(home, "alpha", "job-1"))
    for fields, message in [
        ({"max_replicas": 5}, "max_replicas 5 is above the 4 replicas a tenant's model may"),
        ({"max_replicas": 3, "gpus_per_replica": 1}, r"3 GPUs .* above the 2 GPUs"),
        ({"max_replicas": 4}, r"would have 5 replicas at most .* the limit is 4"),
    ]:
        request = RegisterModelRequest.model_validate(
            {"name": "second", "checkpoint_dir": checkpoint} | fields
        )
        with pytest.raises(QuotaExceeded, match=message):
            registry.register(tenant="alpha", request=request)
        assert rows(sqlite_database) == stored
    with pytest.raises(QuotaExceeded, match="above the 4 replicas"):
        registry.scale(tenant="alpha", model="first", max_replicas=5)
    assert rows(sqlite_database) == stored


def test_the_quota_sums_gpus_over_a_tenants_models() -> None:
    quota = TenantQuota(replicas_per_model=8, gpus_per_model=2, replicas=8, gpus=3)
    two_gpus = ReplicaOptions(max_replicas=2, gpus_per_replica=1)
    quota.check("m", two_gpus, [ReplicaOptions(max_replicas=3)])  # CPU replicas cost no GPU
    with pytest.raises(QuotaExceeded, match=r"take 4 GPUs at most .* the limit is 3"):
        quota.check("m", two_gpus, [two_gpus])


@pytest.mark.integration
@pytest.mark.slow
def test_file_models_start_and_resolve_by_alias(
    serve_instance: None, make_registry: RegistryFactory, home: Path, tenant: str, token: str
) -> None:
    name = f"shared-{token}"
    registry = make_registry(file_model(home, name, aliases=[f"alias-{name}"], max_replicas=2))
    registry.start()

    resolved = registry.resolve(tenant=tenant, model=f"alias-{name}")
    assert (resolved.name, resolved.app_name, resolved.source) == (
        name,
        file_app_name(name),
        "file",
    )
    handle = registry.resolver.handle_for(tenant="anyone", model=f"alias-{name}")
    assert handle.generate.remote(REQUEST).result().text == REPLY

    (info,) = registry.list(tenant)
    assert (info.name, info.source, info.status, info.replicas) == (name, "file", "RUNNING", 1)
    assert (info.min_replicas, info.max_replicas) == (1, 2)

    with pytest.raises(Forbidden):
        registry.unregister(tenant=tenant, model=name)
    with pytest.raises(Forbidden):
        registry.scale(tenant=tenant, model=f"alias-{name}", max_replicas=3)
    assert deployed_bounds(file_app_name(name)) == (1, 2)


@pytest.mark.integration
@pytest.mark.slow
def test_an_operators_scale_of_a_file_model_is_stored_and_survives_a_restart(
    serve_instance: None,
    make_registry: RegistryFactory,
    home: Path,
    token: str,
    sqlite_database: Database,
) -> None:
    name = f"shared-{token}"
    spec = file_model(home, name, aliases=[f"alias-{name}"], max_replicas=2)
    app_name = file_app_name(name)
    registry = make_registry(spec)
    registry.start()

    with pytest.raises(InvalidRequest, match="replica bounds"):
        registry.scale(tenant="ops", model=name, min_replicas=3, operator=True)
    assert stored_scales(sqlite_database) == []
    scaled = registry.scale(tenant="ops", model=f"alias-{name}", min_replicas=2, operator=True)
    assert (scaled.name, scaled.min_replicas, scaled.max_replicas) == (name, 2, 2)
    assert stored_scales(sqlite_database) == [(name, 2, 2, "ops")]
    wait_until(lambda: deployed_bounds(app_name) == (2, 2), "Serve did not take the new bounds")
    # Every tenant sees it, and so does another API process that never scaled it.
    assert [(m.min_replicas, m.max_replicas) for m in make_registry(spec).list("anyone")] == [
        (2, 2)
    ]
    # Only one bound given: the other is the stored one, not the models file's.
    registry.scale(tenant="ops", model=name, max_replicas=3, operator=True)
    assert stored_scales(sqlite_database) == [(name, 2, 3, "ops")]

    # A restart against a fresh Ray (the app is gone): the file model deploys with the
    # stored bounds, not the file's 1..2.
    serve.delete(app_name)
    restarted = make_registry(spec)
    restarted.start()
    wait_until(lambda: deployed_bounds(app_name) == (2, 3), "not deployed with stored bounds")
    wait_until(lambda: ServeDeployer().replicas(app_name) == 2, "did not start 2 replicas")
    (info,) = restarted.list("anyone")
    assert (info.min_replicas, info.max_replicas, info.replicas) == (2, 3, 2)


@pytest.mark.integration
@pytest.mark.slow
def test_register_is_idempotent_and_conflicts_on_a_different_body(
    serve_instance: None,
    make_registry: RegistryFactory,
    home: Path,
    tenant: str,
    sqlite_database: Database,
) -> None:
    registry = make_registry()
    checkpoint = own_checkpoint(home, tenant, "job-1", "final")
    adapter = make_checkpoint(
        job_checkpoint_dir(home / "checkpoints", tenant, "job-1") / "lora", "adapter_config.json"
    )
    request = RegisterModelRequest(
        name="my-sft", checkpoint_dir=str(checkpoint), adapter_dir=str(adapter), max_batch_size=4
    )
    info = registry.register(tenant=tenant, request=request)
    assert (info.source, info.status, info.replicas) == ("registered", "RUNNING", 1)
    assert info.adapter_dir == str(adapter)
    app_name = tenant_app_name(tenant, "my-sft")
    replica_ids = running_replica_ids(app_name)

    assert registry.register(tenant=tenant, request=request) == info
    assert running_replica_ids(app_name) == replica_ids  # a no-op, not a redeploy
    with pytest.raises(Conflict, match="max_batch_size"):
        registry.register(tenant=tenant, request=request.model_copy(update={"max_batch_size": 8}))
    with pytest.raises(Conflict, match="through /models/scale"):
        registry.register(tenant=tenant, request=request.model_copy(update={"max_replicas": 2}))

    handle = registry.resolver.handle_for(tenant=tenant, model="my-sft")
    assert handle.generate.remote(REQUEST).result().text == REPLY
    with pytest.raises(NotFound):  # another tenant's model is invisible
        registry.resolver.handle_for(tenant="someone-else", model="my-sft")
    assert [m.name for m in registry.list("someone-else")] == []

    registry.unregister(tenant=tenant, model="my-sft")
    assert rows(sqlite_database) == []
    assert app_name not in serve.status().applications
    with pytest.raises(NotFound):
        registry.resolve(tenant=tenant, model="my-sft")


@pytest.mark.integration
@pytest.mark.slow
def test_a_failed_deploy_leaves_nothing_registered(
    serve_instance: None,
    make_registry: RegistryFactory,
    home: Path,
    tenant: str,
    sqlite_database: Database,
) -> None:
    # The scripted engine is given a string for its config: its constructor fails in
    # every replica, as a corrupt checkpoint would.
    registry = make_registry(engine=partial(scripted_engine, "not a config"))
    checkpoint = own_checkpoint(home, tenant, "broken")
    request = RegisterModelRequest(name="broken", checkpoint_dir=str(checkpoint))
    with pytest.raises(ModelDeployError, match="failed to start") as caught:
        registry.register(tenant=tenant, request=request)
    # The last line of Serve's own message: the constructor's error.
    assert str(caught.value).endswith("AttributeError: 'str' object has no attribute 'reply'")
    assert rows(sqlite_database) == []
    assert tenant_app_name(tenant, "broken") not in serve.status().applications


@pytest.mark.integration
@pytest.mark.slow
def test_scaling_changes_replicas_in_place_with_a_request_in_flight(
    serve_instance: None,
    make_registry: RegistryFactory,
    home: Path,
    tenant: str,
    sqlite_database: Database,
) -> None:
    records = Records(home / "records")
    registry = make_registry(engine=partial(probe_engine, records.config(reply=REPLY)))
    checkpoint = own_checkpoint(home, tenant, "scale-me")
    registry.register(
        tenant=tenant, request=RegisterModelRequest(name="busy", checkpoint_dir=str(checkpoint))
    )
    app_name = tenant_app_name(tenant, "busy")
    (first_replica,) = running_replica_ids(app_name)
    deployer = ServeDeployer()

    held = GenerationRequest(prompt="id=busy hold", sampling=SamplingOptions())
    in_flight = registry.resolver.handle_for(tenant=tenant, model="busy").generate.remote(held)
    # The replica runs the request (and holds it until released) before the scale.
    wait_until(lambda: records.started("busy"), "the replica to start the request")
    scaled = registry.scale(tenant=tenant, model="busy", replicas=2)
    assert (scaled.min_replicas, scaled.max_replicas) == (2, 2)
    assert rows(sqlite_database) == [(tenant, "busy", 2, 2)]

    wait_until(lambda: deployer.replicas(app_name) == 2, "did not scale up to 2 replicas")
    assert first_replica in running_replica_ids(app_name), "scaling restarted the replica"
    records.release()
    assert in_flight.result(timeout_s=30).text == REPLY

    registry.scale(tenant=tenant, model="busy", max_replicas=1, min_replicas=1)
    wait_until(lambda: deployer.replicas(app_name) == 1, "did not scale down to 1 replica")
    listed = {m.name: m for m in registry.list(tenant)}["busy"]
    assert (listed.min_replicas, listed.max_replicas, listed.replicas) == (1, 1, 1)


@pytest.mark.integration
@pytest.mark.slow
def test_a_restarted_registry_serves_registered_models_again(
    serve_instance: None, make_registry: RegistryFactory, home: Path, tenant: str
) -> None:
    checkpoint = own_checkpoint(home, tenant, "survivor")
    make_registry().register(
        tenant=tenant, request=RegisterModelRequest(name="survivor", checkpoint_dir=str(checkpoint))
    )
    app_name = tenant_app_name(tenant, "survivor")
    replica_ids = running_replica_ids(app_name)

    # The API server restarts while Ray keeps running: the app is redeployed unchanged
    # and keeps its replica.
    make_registry().start()
    assert running_replica_ids(app_name) == replica_ids

    # Ray lost the app (a fresh cluster): the row brings it back.
    serve.delete(app_name)
    with pytest.raises(ModelUnavailable):
        make_registry().resolver.handle_for(tenant=tenant, model="survivor")
    restarted = make_registry()
    restarted.start()
    handle = restarted.resolver.handle_for(tenant=tenant, model="survivor")
    assert handle.generate.remote(REQUEST).result().text == REPLY
    assert [(m.name, m.status) for m in restarted.list(tenant)] == [("survivor", "RUNNING")]


@pytest.mark.integration
@pytest.mark.slow
def test_every_option_of_a_registration_reaches_its_replicas_and_a_restored_app(
    serve_instance: None, make_registry: RegistryFactory, home: Path, tenant: str, token: str
) -> None:
    """Options beyond the sizing ones (device, dtype, CPUs, queue bound, batch wait) are
    stored, listed and built into the replicas, also when the row brings the app back.
    The tenant's quota does not limit an operator's scale of a shared model."""
    quota = TenantQuota(replicas_per_model=1, gpus_per_model=0, replicas=1, gpus=0)
    shared = file_model(home, f"shared-{token}")
    registry = make_registry(shared, engine=options_engine, quota=quota)
    registry.start()
    request = RegisterModelRequest(
        name="tuned",
        checkpoint_dir=str(own_checkpoint(home, tenant, "job-1")),
        device="cpu",
        dtype="float32",
        cpus_per_replica=0.3,
        max_queued_requests=5,
        batch_wait_timeout_s=0.02,
    )
    info = registry.register(tenant=tenant, request=request)
    app_name = tenant_app_name(tenant, "tuned")
    wanted = ("llm", "cpu", "float32", 0.3, 5, 0.02)

    def served() -> tuple[object, ...]:
        (listed,) = [m for m in registry.list(tenant) if m.name == "tuned"]
        config = deployment_config(app_name)
        reply = registry.resolver.handle_for(tenant=tenant, model="tuned")
        return (
            (
                listed.kind,
                listed.device,
                listed.dtype,
                listed.cpus_per_replica,
                listed.max_queued_requests,
                listed.batch_wait_timeout_s,
            ),
            (config["ray_actor_options"]["num_cpus"], config["max_queued_requests"]),
            reply.generate.remote(REQUEST).result().text,
        )

    assert (info.kind, info.device, info.dtype, info.cpus_per_replica) == wanted[:4]
    assert served() == (wanted, (0.3, 5), "cpu float32 0.3 5")

    serve.delete(app_name)  # Ray lost the app: the row alone brings it back
    registry = make_registry(shared, engine=options_engine, quota=quota)
    registry.start()
    assert served() == (wanted, (0.3, 5), "cpu float32 0.3 5")

    scaled = registry.scale(tenant="ops", model=shared.name, max_replicas=2, operator=True)
    assert scaled.max_replicas == 2


@pytest.mark.integration
@pytest.mark.slow
def test_the_embedded_default_serves_the_real_demo_model_under_the_spec_names(
    serve_instance: None, embedding_app: EmbeddingApp, sqlite_database: Database, tmp_path: Path
) -> None:
    """The embedding model's app is the session's (the same spec): start() finds it
    running, and it stays for the tests after this one."""
    settings = Settings(home=tmp_path / "home")
    catalog = load_catalog(settings)
    assert catalog.demo_model_dir is not None and catalog.demo_reward_dir is not None
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(deploy_timeout_s=120),
        # The demo guard models have their own end-to-end tests (tests/agents/shields); the
        # embedding model is the session's app, found running.
        file_models=[
            m for m in catalog.models if m.name in ("demo", "demo-reward", "all-minilm-l6-v2")
        ],
        model_roots=ModelRoots(shared=()),
    )
    try:
        # As `corral serve` does before starting: the policy, then its reward model.
        build_demo_model(catalog.demo_model_dir)
        build_demo_reward_model(catalog.demo_reward_dir, policy_dir=catalog.demo_model_dir)
        registry.start()  # deploys both with the real engines
        assert (catalog.demo_model_dir / "config.json").is_file()
        handle = registry.resolver.handle_for(tenant="default", model="llama3_8b_chat")
        request = GenerationRequest(
            prompt="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
            sampling=SamplingOptions(max_tokens=4),
        )
        result = handle.generate.remote(request).result()
        assert len(result.token_ids) == 4
        assert registry.resolve(tenant="default", model="llama3_70b").app_name == "llm-demo"

        reward = registry.resolver.handle_for(
            tenant="default", model="llama3_405b_reward", kind="reward"
        )
        words, symbols = (
            reward.score.remote(
                ScoringRequest(
                    messages=(ChatMessage("user", "Say something."), ChatMessage("assistant", a))
                )
            ).result()
            for a in ("The capital of France is Paris.", "?? 12 ## !! 7,, ;;")
        )
        assert words > symbols  # the demo reward model prefers letters

        embedder = registry.resolver.handle_for(
            tenant="default", model="all-minilm-l6-v2", kind="embedding"
        )
        assert len(embedder.embed.remote("hello").result()) == 384
        assert serve.status().applications[embedding_app.app_name].status == "RUNNING"
    finally:
        serve.delete("llm-demo")
        serve.delete("llm-demo-reward")
