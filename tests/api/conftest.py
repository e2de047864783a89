"""An app over a real, migrated database (both backends), with a real content fetcher
whose only file root is a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from corral.app import create_app, fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher
from corral.store.db import Database

API_KEYS = "alpha:key-alpha,beta:key-beta"
ALPHA = {"Authorization": "Bearer key-alpha"}
BETA = {"Authorization": "Bearer key-beta"}


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    root.mkdir()
    return root


@pytest.fixture
def settings(tmp_path: Path, dataset_root: Path) -> Settings:
    return Settings(home=tmp_path / "home", api_keys=API_KEYS, dataset_roots=str(dataset_root))


@pytest.fixture
def client(settings: Settings, database: Database) -> Iterator[TestClient]:
    app = create_app(settings, database=database, fetcher=ContentFetcher(fetch_policy(settings)))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
