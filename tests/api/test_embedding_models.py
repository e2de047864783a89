"""Embedding models through the control plane, on real Ray Serve: the embedded default's
all-minilm-l6-v2 (the session's `embedding_app`) resolves as an embedding model and
nothing else; a tenant registers a sentence-transformers directory as `kind: embedding`
through /models/register and embeds with it; kinds never cross (422)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.errors import InvalidRequest
from corral.services import model_calls
from corral.services.models import ModelService, build_model_service
from corral.serving.catalog import model_roots, tenant_app_name
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from serve_apps.options import ReplicaOptions
from tests.conftest import EmbeddingApp, add_registered_model_row
from tests.serve_apps.test_sentence_transformers_embedding import TOLERANCE, in_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEYS = "alpha:key-alpha,beta:key-beta"
ALPHA = {"Authorization": "Bearer key-alpha"}
BETA = {"Authorization": "Bearer key-beta"}


@dataclass(frozen=True)
class Served:
    client: TestClient
    registry: ModelService
    database: Database
    home: Path


@pytest.fixture(scope="module")
def served(
    embedding_app: EmbeddingApp,
    embedding_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Served]:
    """An API server whose file models are the session's embedding model (already
    running: start() leaves it be) and an LLM that is never deployed; a copy of the
    MiniLM directory under the shared model root, for tenants to register."""
    home = tmp_path_factory.mktemp("embedding-api") / "home"
    shutil.copytree(embedding_model_dir, home / "models" / "minilm")
    url = f"sqlite:///{home.parent / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=180),
        file_models=[embedding_app.spec],
        model_roots=model_roots(Settings(home=home)),
        registration_defaults=ReplicaOptions(cpus_per_replica=0.25, device="cpu"),
    )
    registry.start()
    app = create_app(Settings(home=home, api_keys=KEYS), database=database, models=registry)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield Served(client, registry, database, home)
    finally:
        serve.delete(tenant_app_name("alpha", "my-minilm"), _blocking=False)
        database.dispose()


def test_the_file_model_resolves_as_an_embedding_model_only(
    served: Served, embedding_app: EmbeddingApp
) -> None:
    resolver = served.registry.resolver
    handle = resolver.handle_for(tenant="beta", model=embedding_app.name, kind="embedding")
    assert len(asyncio.run(model_calls.embed(handle, ["hello"]))[0]) == 384
    for kind, message in [
        ("llm", "is an embedding model, not an llm"),
        ("reward", "is an embedding model, not a reward model"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            resolver.handle_for(tenant="beta", model=embedding_app.name, kind=kind)
    # Over HTTP: an embedding model answers no completion, and is no OpenAI model.
    chat = {"model": embedding_app.name, "messages": [{"role": "user", "content": "hi"}]}
    response = served.client.post("/v1/chat/completions", json=chat, headers=BETA)
    assert response.status_code == 422, response.text
    assert "is an embedding model, not an llm" in response.json()["error"]["message"]
    listed = served.client.get("/v1/models", headers=BETA).json()["data"]
    assert embedding_app.name not in {m["id"] for m in listed}
    models = {m["name"]: m for m in served.client.get("/models", headers=BETA).json()["data"]}
    assert models[embedding_app.name]["kind"] == "embedding"


def test_an_llm_asked_for_as_an_embedding_model_is_refused(served: Served) -> None:
    add_registered_model_row(
        served.database, tenant="beta", name="chatty", checkpoint_dir="/nowhere"
    )
    with pytest.raises(InvalidRequest, match="'chatty' is an llm, not an embedding model"):
        served.registry.resolver.handle_for(tenant="beta", model="chatty", kind="embedding")


def test_a_tenant_registers_a_sentence_transformers_directory(
    served: Served, embedding_model_dir: Path
) -> None:
    body = {
        "name": "my-minilm",
        "kind": "embedding",
        "checkpoint_dir": str(served.home / "models" / "minilm"),
    }
    refused = served.client.post(
        "/models/register", json=body | {"adapter_dir": body["checkpoint_dir"]}, headers=ALPHA
    )
    assert refused.status_code == 422, refused.text
    registered = served.client.post("/models/register", json=body, headers=ALPHA)
    assert registered.status_code == 200, registered.text
    assert registered.json()["kind"] == "embedding"

    handle = served.registry.resolver.handle_for(
        tenant="alpha", model="my-minilm", kind="embedding"
    )
    texts = ["a registered embedding model", "answers for its tenant"]
    vectors = asyncio.run(model_calls.embed(handle, texts))
    np.testing.assert_allclose(
        np.array(vectors), in_process(embedding_model_dir, texts), atol=TOLERANCE
    )
    # Another tenant has no such model.
    with pytest.raises(Exception, match="no model 'my-minilm'"):
        served.registry.resolver.handle_for(tenant="beta", model="my-minilm", kind="embedding")
