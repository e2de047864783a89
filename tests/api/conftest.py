"""An app over a real, migrated database (both backends), with a real content fetcher
whose only file root is a temporary directory (partitioned by tenant, like every dataset
root: `dataset_root` is tenant alpha's own directory in it). Every response any API test
receives through a TestClient is validated against the app's OpenAPI document as it is
read (tests/api/response_validation.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from corral import openapi_doc
from corral.app import create_app, fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher
from corral.ray_jobs import JobLauncher
from corral.services.admission import ClusterResources
from corral.services.models import build_model_service
from corral.serving.catalog import ModelSpec, model_roots
from corral.serving.deployer import ServeDeployer
from corral.storage import Storage
from corral.store.db import Database
from corral.tenancy import tenant_dir
from tests.api import response_validation

API_KEYS = "alpha:key-alpha,beta:key-beta"
ALPHA = {"Authorization": "Bearer key-alpha"}
BETA = {"Authorization": "Bearer key-beta"}


@pytest.fixture(scope="session")
def response_validator() -> response_validation.ResponseValidator:
    return response_validation.ResponseValidator(openapi_doc.committed())


@pytest.fixture(autouse=True)
def validate_responses(
    monkeypatch: pytest.MonkeyPatch, response_validator: response_validation.ResponseValidator
) -> response_validation.ResponseValidator:
    """Every API test: bodies, SSE items and JSONL lines checked against the document."""
    response_validation.install(monkeypatch, response_validator)
    return response_validator


@pytest.fixture
def shared_dataset_root(tmp_path: Path) -> Path:
    """The app's one dataset root (`CORRAL_DATASET_ROOTS`), one directory per tenant in it."""
    root = tmp_path / "datasets"
    root.mkdir()
    return root


@pytest.fixture
def dataset_root(shared_dataset_root: Path) -> Path:
    """Tenant alpha's own directory under the dataset root: where alpha's files go."""
    root = tenant_dir(shared_dataset_root, "alpha")
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path: Path, shared_dataset_root: Path) -> Settings:
    return Settings(
        home=tmp_path / "home", api_keys=API_KEYS, dataset_roots=str(shared_dataset_root)
    )


@pytest.fixture
def client(settings: Settings, database: Database) -> Iterator[TestClient]:
    app = create_app(settings, database=database, fetcher=ContentFetcher(fetch_policy(settings)))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def training_app(
    settings: Settings,
    database: Database,
    *,
    model_dir: Path,
    launcher: JobLauncher,
    cluster_resources: ClusterResources | None = None,
    available_resources: ClusterResources | None = None,
) -> FastAPI:
    """An app that can submit fine-tuning jobs: a real model registry (not started: no
    Serve needed to locate weights) with `model_dir` as `llama3_8b`, and `launcher`."""
    storage = Storage.from_settings(settings)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(storage=storage.options, model_cache_dir=settings.model_cache_dir),
        file_models=[ModelSpec(name="demo", aliases=["llama3_8b"], checkpoint_dir=model_dir)],
        model_roots=model_roots(settings),
        storage=storage,
    )
    return create_app(
        settings,
        database=database,
        fetcher=ContentFetcher(fetch_policy(settings)),
        models=registry,
        launcher=launcher,
        cluster_resources=cluster_resources,
        available_resources=available_resources,
    )
