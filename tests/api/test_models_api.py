"""The models routes (`/models*`, Corral's own, tagged "Corral") and the `corral models`
commands that call them, against a registry on a real local Ray Serve (scripted engine)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray import serve
from ray.serve.context import _get_global_client
from sqlalchemy import select

from corral.app import create_app
from corral.cli import CliError, remote, run
from corral.client import CorralClient
from corral.config import Settings
from corral.services.models import ModelService, TenantQuota, build_model_service
from corral.serving.catalog import ModelSpec, model_roots
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from corral.store.tables import FileModelScale
from corral.tenancy import job_checkpoint_dir
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.llm import DEPLOYMENT_NAME
from serve_apps.options import ReplicaOptions

API_KEYS = "alpha:key-alpha,beta:key-beta"
OPERATOR_KEYS = "ops:key-ops"
ALPHA = {"Authorization": "Bearer key-alpha"}
BETA = {"Authorization": "Bearer key-beta"}
OPS = {"Authorization": "Bearer key-ops"}


def _app(
    settings: Settings, database: Database | None = None, models: ModelService | None = None
) -> FastAPI:
    return create_app(settings, database=database, models=models)


def _checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture(scope="module")
def served(
    serve_instance: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, Path, str]]:
    """An API server whose models service is started, with one file model;
    yields the client, CORRAL_HOME and the file model's name. Tenants alpha and beta,
    and an operator (tenant ops)."""
    home = tmp_path_factory.mktemp("models-api") / "home"
    token = uuid.uuid4().hex[:8]
    shared = f"api-shared-{token}"
    url = f"sqlite:///{home.parent / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=60),
        file_models=[
            ModelSpec(
                name=shared,
                aliases=[f"{shared}-alias"],
                checkpoint_dir=_checkpoint(home / "models" / shared),
                cpus_per_replica=0.25,
                max_replicas=2,
            )
        ],
        model_roots=model_roots(Settings(home=home)),
        engine_factory=partial(scripted_engine, ScriptedEngineConfig("hello there")),
        registration_defaults=ReplicaOptions(cpus_per_replica=0.25),
        quota=TenantQuota.from_settings(Settings(home=home, tenant_max_gpus_per_model=1)),
    )
    registry.start()
    app = _app(
        Settings(home=home, api_keys=API_KEYS, operator_keys=OPERATOR_KEYS),
        database=database,
        models=registry,
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield client, home, shared
    finally:
        for name in list(serve.status().applications):
            if token in name or name.startswith(("llm-tuned@", "llm-opts@")):
                serve.delete(name, _blocking=False)
        database.dispose()


def test_without_a_registry_the_models_routes_answer_501(
    sqlite_database: Database, tmp_path: Path
) -> None:
    app = _app(Settings(home=tmp_path), database=sqlite_database)
    with TestClient(app) as client:
        response = client.get("/models")
    assert response.status_code == 501
    assert response.json()["error"]["capability"] == "models"


def test_models_routes_are_tagged_outside_the_spec(tmp_path: Path) -> None:
    document = _app(Settings(home=tmp_path)).openapi()
    operations = {
        (method, path): item["tags"]
        for path, methods in document["paths"].items()
        if path.startswith("/models")
        for method, item in methods.items()
    }
    assert set(operations) == {
        ("get", "/models"),
        ("post", "/models/register"),
        ("post", "/models/scale"),
        ("delete", "/models/delete"),
    }
    assert all(tags == ["Corral"] for tags in operations.values())


@pytest.mark.integration
@pytest.mark.slow
def test_register_takes_every_option_and_refuses_what_cannot_be_served(
    served: tuple[TestClient, Path, str],
) -> None:
    client, home, shared = served
    checkpoint = _checkpoint(job_checkpoint_dir(home / "checkpoints", "beta", "job-9") / "final")
    body = {"name": "opts", "checkpoint_dir": str(checkpoint)}
    for fields, status, code in [
        ({"kind": "reward"}, 422, "invalid_request"),  # a kind without an app yet
        ({"kind": "poem"}, 422, "validation_error"),
        ({"engine": "vllm"}, 422, "invalid_request"),
        ({"cpus_per_replica": 0}, 422, "validation_error"),
        ({"gpus_per_replica": 1, "max_replicas": 2}, 403, "quota_exceeded"),  # 2 GPUs > 1
    ]:
        refused = client.post("/models/register", json=body | fields, headers=BETA)
        assert (refused.status_code, refused.json()["error"]["code"]) == (status, code), fields
        assert [m["name"] for m in client.get("/models", headers=BETA).json()["data"]] == [shared]

    options = {
        "device": "cpu",
        "dtype": "float32",
        "cpus_per_replica": 0.25,
        "max_queued_requests": 7,
        "batch_wait_timeout_s": 0.02,
        "upscale_delay_s": 1.0,
    }
    registered = client.post("/models/register", json=body | options, headers=BETA)
    assert registered.status_code == 200, registered.text
    listed = [m for m in client.get("/models", headers=BETA).json()["data"] if m["name"] == "opts"]
    assert listed == [registered.json()]
    assert {name: listed[0][name] for name in options} == options
    assert (listed[0]["kind"], listed[0]["engine"]) == ("llm", "transformers")
    assert (
        client.delete("/models/delete", params={"model": "opts"}, headers=BETA).status_code == 200
    )


@pytest.mark.integration
@pytest.mark.slow
def test_list_register_scale_and_delete(served: tuple[TestClient, Path, str]) -> None:
    client, home, shared = served
    listed = client.get("/models", headers=ALPHA).json()["data"]
    assert [(m["name"], m["source"], m["status"], m["replicas"]) for m in listed] == [
        (shared, "file", "RUNNING", 1)
    ]
    assert client.get("/models").status_code == 401

    checkpoint = _checkpoint(job_checkpoint_dir(home / "checkpoints", "alpha", "job-7") / "final")
    escape = {"name": "tuned", "checkpoint_dir": f"{home}/checkpoints/../../../etc"}
    refused = client.post("/models/register", json=escape, headers=ALPHA)
    assert refused.status_code == 422, refused.text
    assert "without '..'" in refused.json()["error"]["message"]
    body = {"name": "tuned", "checkpoint_dir": str(checkpoint), "max_replicas": 2}
    assert client.post("/models/register", json=body | {"gpu": 1}, headers=ALPHA).status_code == 422

    registered = client.post("/models/register", json=body, headers=ALPHA)
    assert registered.status_code == 200, registered.text
    info = registered.json()
    assert (info["name"], info["source"], info["status"], info["replicas"]) == (
        "tuned",
        "registered",
        "RUNNING",
        1,
    )
    assert client.post("/models/register", json=body, headers=ALPHA).json() == info
    conflict = client.post("/models/register", json=body | {"max_batch_size": 2}, headers=ALPHA)
    assert conflict.status_code == 409
    assert [m["name"] for m in client.get("/models", headers=BETA).json()["data"]] == [shared]

    # Only the upper bound: no replica has to start (the registry tests watch that).
    scaled = client.post("/models/scale", json={"model": "tuned", "max_replicas": 3}, headers=ALPHA)
    assert scaled.status_code == 200, scaled.text
    assert scaled.json() == {"name": "tuned", "min_replicas": 1, "max_replicas": 3, "replicas": 1}
    both = {"model": "tuned", "replicas": 2, "min_replicas": 1}
    assert client.post("/models/scale", json=both, headers=ALPHA).status_code == 422
    assert client.post("/models/scale", json={"model": "tuned"}, headers=ALPHA).status_code == 422
    unknown = {"model": "tuned", "replicas": 1}
    assert client.post("/models/scale", json=unknown, headers=BETA).status_code == 404

    shared_delete = client.delete("/models/delete", params={"model": shared}, headers=ALPHA)
    assert shared_delete.status_code == 403
    assert shared_delete.json()["error"]["code"] == "forbidden"
    assert client.delete("/models/delete", params={"model": shared}, headers=OPS).status_code == 422

    # Cluster-wide: only an operator sees every tenant's models, each with its tenant.
    everything = client.get("/models", params={"all": "true"}, headers=OPS)
    assert everything.status_code == 200, everything.text
    assert [(m["name"], m["source"], m["tenant"]) for m in everything.json()["data"]] == [
        (shared, "file", None),
        ("tuned", "registered", "alpha"),
    ]
    assert [m["name"] for m in client.get("/models", headers=OPS).json()["data"]] == [shared]
    refused_all = client.get("/models", params={"all": "true"}, headers=ALPHA)
    assert refused_all.status_code == 403
    assert refused_all.json()["error"]["code"] == "forbidden"
    assert (
        client.delete("/models/delete", params={"model": "tuned"}, headers=ALPHA).status_code == 200
    )
    assert (
        client.delete("/models/delete", params={"model": "tuned"}, headers=ALPHA).status_code == 404
    )
    assert [m["name"] for m in client.get("/models", headers=ALPHA).json()["data"]] == [shared]


@pytest.mark.integration
@pytest.mark.slow
def test_only_an_operator_scales_the_shared_model_and_the_bounds_are_stored(
    served: tuple[TestClient, Path, str],
) -> None:
    client, home, shared = served
    before = client.get("/models", headers=ALPHA).json()["data"]
    for tenant in (ALPHA, BETA):
        refused = client.post(
            "/models/scale", json={"model": f"{shared}-alias", "max_replicas": 3}, headers=tenant
        )
        assert refused.status_code == 403, refused.text
        assert "only an operator key" in refused.json()["error"]["message"]
    assert client.get("/models", headers=ALPHA).json()["data"] == before
    assert _stored_scales(home) == []

    # Only the upper bound: no replica has to start.
    scaled = client.post("/models/scale", json={"model": shared, "max_replicas": 3}, headers=OPS)
    assert scaled.status_code == 200, scaled.text
    assert scaled.json() == {"name": shared, "min_replicas": 1, "max_replicas": 3, "replicas": 1}
    assert _stored_scales(home) == [(shared, 1, 3, "ops")]
    listed = client.get("/models", headers=BETA).json()["data"]
    assert [(m["name"], m["max_replicas"]) for m in listed] == [(shared, 3)]
    # Back to the file's bounds for whoever uses the shared model next, once Serve runs
    # them (the change is applied after the call returns).
    back = client.post("/models/scale", json={"model": shared, "max_replicas": 2}, headers=OPS)
    assert back.status_code == 200
    deadline = time.monotonic() + 60
    while (
        _deployed_max_replicas(shared) != 2
        or serve.status().applications[f"llm-{shared}"].status != "RUNNING"
    ):
        assert time.monotonic() < deadline, "the shared model did not run 1..2 again"
        time.sleep(0.25)


def _deployed_max_replicas(model: str) -> int:
    """What Serve runs the file model's app with (not what the registry says)."""
    details = _get_global_client().get_serve_details()
    deployment = details["applications"][f"llm-{model}"]["deployments"][DEPLOYMENT_NAME]
    return int(deployment["deployment_config"]["autoscaling_config"]["max_replicas"])


def _stored_scales(home: Path) -> list[tuple[str, int, int, str]]:
    database = Database(f"sqlite:///{home.parent / 'corral.db'}")  # the `served` app's
    try:
        with database.transaction() as session:
            found = session.scalars(select(FileModelScale).order_by(FileModelScale.name))
            return [(r.name, r.min_replicas, r.max_replicas, r.scaled_by) for r in found]
    finally:
        database.dispose()


@pytest.mark.integration
@pytest.mark.slow
def test_the_cli_lists_and_scales_through_the_api(
    served: tuple[TestClient, Path, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, home, shared = served
    client.headers.update(ALPHA)  # a tenant's key, as CORRAL_API_KEY would carry it
    try:
        # The commands' own HTTP client is swapped for one on the test client.
        monkeypatch.setattr(remote, "connect", lambda _url: CorralClient.over(client))
        monkeypatch.setenv("CORRAL_HOME", str(home))

        assert run(["models", "list"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == [
            "NAME",
            "SOURCE",
            "STATUS",
            "REPLICAS",
            "MIN",
            "MAX",
            "GPUS",
            "ALIASES",
        ]
        assert table[1].split() == [
            shared,
            "file",
            "RUNNING",
            "1",
            "1",
            "2",
            "0",
            f"{shared}-alias",
        ]

        scale = ["models", "scale", f"{shared}-alias", "--min", "2", "--wait"]
        with pytest.raises(CliError, match=r"403 model .* only an operator key scales it"):
            run(scale)
        client.headers.update(OPS)  # an operator's key
        assert run(scale) == 0
        out = capsys.readouterr().out
        assert f"{shared}: replicas 2..2" in out
        assert f"{shared}: 2 running" in out

        with pytest.raises(CliError, match="404 no model 'nothing'"):
            run(["models", "scale", "nothing", "--replicas", "1"])
        # Back to one replica for whoever uses the shared model next.
        CorralClient.over(client).scale_model(shared, min_replicas=1)
    finally:
        for key in ALPHA:
            client.headers.pop(key, None)


def test_the_cli_checks_its_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    for argv, message in (
        (["models", "scale", "m", "--replicas", "2", "--max", "3"], "either --replicas"),
        (["models", "scale", "m"], "give --replicas, --min or --max"),
    ):
        with pytest.raises(CliError, match=message):
            run(argv)
    assert run(["models", "scale", "m", "--replicas", "0"]) == 2  # a usage error
    assert "must be at least 1" in capsys.readouterr().err

    monkeypatch.setenv(remote.API_KEY_ENV, "secret")
    with pytest.raises(CliError, match=r"cannot reach the Corral server at http://127\.0\.0\.1:9"):
        run(["models", "list", "--url", "http://127.0.0.1:9"])


def test_api_client_sends_the_bearer_key() -> None:
    with CorralClient("http://server:1", api_key="k") as client:
        assert client.http.headers["Authorization"] == "Bearer k"
    with CorralClient("http://server:1") as client:
        assert "Authorization" not in client.http.headers
