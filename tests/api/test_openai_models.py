"""`/v1/models` with the real ModelService: a tenant sees the file models under their
names and every alias, and its own registered models, each name once (a registered name
that shadows a file model's is the tenant's), and every listed name answers. Without Ray
(the listing reads the models file and the database only), then with the official
`openai` client over real HTTP against a started registry on real Serve (scripted engine).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from ray import serve

from corral.api.models import RegisterModelRequest
from corral.app import create_app
from corral.config import Settings
from corral.services.models import build_model_service
from corral.serving.catalog import SPEC_MODEL_NAMES, ModelRoots, ModelSpec, embedded_default
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engine
from serve_apps.options import ReplicaOptions
from tests.api.conftest import ALPHA, API_KEYS, BETA
from tests.api.live_server import live_server
from tests.conftest import add_registered_model_row

REPLY = "Paris is the capital of France."
HI: list[Any] = [{"role": "user", "content": "hi"}]


def _registered_row(database: Database, *, tenant: str, name: str, checkpoint: Path) -> None:
    """A registered model's row, as `/models/register` stores it (no Serve needed to list)."""
    add_registered_model_row(database, tenant=tenant, name=name, checkpoint_dir=checkpoint)


def test_the_embedded_default_lists_the_spec_names_per_tenant(
    database: Database, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path / "home", api_keys=API_KEYS)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=embedded_default(settings.home),
        model_roots=ModelRoots(shared=()),
    )
    _registered_row(database, tenant="alpha", name="mine", checkpoint=tmp_path)
    _registered_row(database, tenant="alpha", name="llama3_8b", checkpoint=tmp_path)
    app = create_app(settings, database=database, models=registry)
    with TestClient(app) as client:
        beta = client.get("/v1/models", headers=BETA)
        assert beta.status_code == 200
        assert beta.json() == {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "corral"}
                # The demo Llama Guard is an llm too (behind the llama_guard shield).
                for name in ("demo", *SPEC_MODEL_NAMES, "demo-llama-guard")
            ],
        }
        alpha = client.get("/v1/models", headers=ALPHA).json()["data"]
        assert [(m["id"], m["owned_by"]) for m in alpha] == [
            ("demo", "corral"),
            ("llama3_8b_chat", "corral"),
            ("llama3_70b_chat", "corral"),
            ("llama3_70b", "corral"),
            ("demo-llama-guard", "corral"),
            ("llama3_8b", "alpha"),  # alpha's own, shadowing the demo model's alias
            ("mine", "alpha"),
        ]
        shared = client.get("/v1/models/llama3_8b_chat", headers=BETA)
        assert shared.status_code == 200
        assert shared.json()["owned_by"] == "corral"
        assert client.get("/v1/models/llama3_8b", headers=ALPHA).json()["owned_by"] == "alpha"
        assert client.get("/v1/models/llama3_8b", headers=BETA).json()["owned_by"] == "corral"
        hidden = client.get("/v1/models/mine", headers=BETA)
        assert hidden.status_code == 404
        assert hidden.json()["error"]["type"] == "not_found_error"


@pytest.fixture(scope="module")
def server(
    serve_instance: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A started registry (one file model answering to the spec's names, and tenant
    alpha's model registered as `llama3_8b`) behind a real uvicorn server. Yields the
    `/v1` URL and the file model's name."""
    home = tmp_path_factory.mktemp("openai-models") / "home"
    token = uuid.uuid4().hex[:8]
    shared = f"oa-{token}"
    checkpoint = home / "models" / shared
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    url = f"sqlite:///{home.parent / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=60),
        file_models=[
            ModelSpec(
                name=shared,
                aliases=list(SPEC_MODEL_NAMES),
                checkpoint_dir=checkpoint,
                cpus_per_replica=0.25,
            )
        ],
        model_roots=ModelRoots(shared=(home / "models",)),
        engine_factory=partial(scripted_engine, ScriptedEngineConfig(REPLY)),
        registration_defaults=ReplicaOptions(cpus_per_replica=0.25),
    )
    try:
        registry.start()
        registry.register(
            tenant="alpha",
            request=RegisterModelRequest(name="llama3_8b", checkpoint_dir=str(checkpoint)),
        )
        app = create_app(Settings(home=home, api_keys=API_KEYS), database=database, models=registry)
        with live_server(app) as base_url:
            yield f"{base_url}/v1", shared
    finally:
        for name in list(serve.status().applications):
            if token in name or name.startswith("llm-llama3_8b@"):
                serve.delete(name, _blocking=False)
        database.dispose()


def _client(base_url: str, headers: dict[str, str]) -> OpenAI:
    key = headers["Authorization"].removeprefix("Bearer ")
    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


@pytest.mark.integration
@pytest.mark.slow
def test_the_openai_client_lists_what_is_served_and_every_listed_name_answers(
    server: tuple[str, str],
) -> None:
    base_url, shared = server
    with _client(base_url, ALPHA) as alpha, _client(base_url, BETA) as beta:
        listed = alpha.models.list().data
        assert [(m.id, m.owned_by) for m in listed] == [
            (shared, "corral"),
            ("llama3_8b_chat", "corral"),
            ("llama3_70b_chat", "corral"),
            ("llama3_70b", "corral"),
            ("llama3_8b", "alpha"),
        ]
        assert [m.id for m in beta.models.list().data] == [shared, *SPEC_MODEL_NAMES]
        assert alpha.models.retrieve("llama3_8b_chat").owned_by == "corral"
        assert alpha.models.retrieve("llama3_8b").owned_by == "alpha"
        assert beta.models.retrieve("llama3_8b").owned_by == "corral"
        with pytest.raises(openai.NotFoundError):
            alpha.models.retrieve("gpt-4")

        for model in listed:
            reply = alpha.chat.completions.create(model=model.id, messages=HI)
            assert reply.choices[0].message.content == REPLY, model.id
        # For beta, llama3_8b is the shared model's alias (alpha's own is invisible to it).
        shared_reply = beta.chat.completions.create(model="llama3_8b", messages=HI)
        assert shared_reply.choices[0].message.content == REPLY
        with pytest.raises(openai.NotFoundError):
            beta.chat.completions.create(model="gpt-4", messages=HI)
