"""The tenant matrix: for every route that names a stored object, tenant alpha's object
is invisible to tenant beta. Beta gets 404 on it (exactly the answer it gets for an id
nobody has used, so nothing leaks), never sees it in a list, and cannot change it; alpha's
own call on it succeeds, so the 404 is the tenant boundary and not a broken route.

Routes join by a row in ROUTES (a new API adds its rows, and its creator in KINDS);
`test_every_route_is_in_the_matrix` fails for a route of the app that is in neither
ROUTES nor NOT_ID_ROUTES. Areas the server does not implement yet have rows
too: there beta's answer must equal alpha's and the never-used id's (404 or
501, nothing more); when such an area lands, its creator stops answering 501 and the
test asks for the rows to be marked implemented.

Only HTTP is used. The app is real: a real model registry on the session's Ray Serve,
whose registered models run the scripted engine (nothing heavy loads) and whose one file
model is the session's embedding app (memory banks, on the session's Milvus Lite server),
and a recording launcher for jobs (no Ray Train)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from ray import serve

from corral.app import create_app
from corral.config import Settings
from corral.services.models import build_model_service
from corral.serving.catalog import model_roots, tenant_app_name
from corral.serving.deployer import ServeDeployer
from corral.sessions import COOKIE_NAME, cookie_may_authenticate
from corral.store import migrate
from corral.store.db import Database
from corral.tenancy import job_checkpoint_dir
from corral.vector_index import MilvusIndex
from serve_apps.engines.scripted import ScriptedEngineConfig, scripted_engines
from serve_apps.options import ReplicaOptions
from tests.api.conftest import ALPHA, API_KEYS, BETA
from tests.api.test_fine_tuning_api import RecordingLauncher
from tests.api.training_requests import lora_sft_request

pytestmark = [pytest.mark.integration]

Headers = dict[str, str]
# A request naming one object: method, path, and httpx's keyword arguments.
Call = tuple[str, str, dict[str, Any]]


def _message(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "tool_calls": [], "tool_responses": []}


SAMPLING = {"temperature": 0.0, "strategy": "greedy", "top_p": 0.95, "top_k": 0}
OPENAI_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


DIALOG = {"message": _message("hi"), "message_history": []}


def _chat(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "dialog": DIALOG,
        "sampling_params": SAMPLING,
        "available_tools": [],
        "max_tokens": 2,
        "stream": False,
        "logprobs": False,
    }


def _batch_chat(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "batch_dialogs": [DIALOG],
        "sampling_params": SAMPLING,
        "available_tools": [],
        "max_tokens": 2,
        "logprobs": False,
    }


def _completion(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "content": "hi",
        "sampling_params": SAMPLING,
        "max_tokens": 2,
        "stream": False,
        "logprobs": False,
    }


def _batch_completion(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "content_batch": ["hi"],
        "sampling_params": SAMPLING,
        "max_tokens": 2,
        "logprobs": False,
    }


def _generation(model: str) -> dict[str, Any]:
    return {
        "prompts": [_message("hi")],
        "filtering_function": "none",
        "reward_scoring": {"generation": {"model": model, "num_candidates": 1}},
    }


def _score(model: str) -> dict[str, Any]:
    generation = _message("hello") | {"role": "assistant"}
    return {
        "model": model,
        "prompt_generations": [{"dialog": DIALOG, "k_generations": [generation]}],
    }


# ------------------------------------------------------------------ what alpha creates


@dataclass(frozen=True)
class Kind:
    """A kind of stored object: how alpha creates one under an id, and what alpha sees of
    it (compared before and after beta's calls: beta must change nothing)."""

    creators: tuple[str, ...]  # the routes that create it ("METHOD /path")
    create: Callable[[World, str], httpx.Response]
    witness: Callable[[World, str], Any]
    implemented: bool = True
    # The id of the object the rows share (default: a made-up one).
    shared_id: str | None = None


@dataclass
class World:
    """The app and what the tests created in it."""

    client: TestClient
    home: Path
    shared_dir: Path  # a directory under CORRAL_HOME/models: every tenant may register it
    token: str
    objects: dict[str, str] = field(default_factory=dict)  # kind -> its shared object's id
    used: dict[str, int] = field(default_factory=dict)  # kind -> fresh ids taken

    def call(self, call: Call, headers: Headers) -> httpx.Response:
        method, path, kwargs = call
        return self.client.request(method, path, headers=headers, **kwargs)


def _create_dataset(world: World, oid: str) -> httpx.Response:
    dataset = {
        "columns": {"text": "text"},
        "content_url": "data:application/jsonl,%7B%22text%22%3A%22hi%22%7D",
        "metadata": {"owner": "alpha"},
    }
    body = {"uuid": oid, "dataset": dataset}
    return world.client.post("/datasets/create", json=body, headers=ALPHA)


def _create_job(world: World, oid: str) -> httpx.Response:
    """Alpha fine-tunes its own registered `llama3_70b` (no file model answers it)."""
    model = _object(world, "model", fresh=False)
    dialogs = (
        '{"dialog": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    )
    dataset = {
        "columns": {"dialog": "dialog"},
        "content_url": "data:application/jsonl," + dialogs,
        "metadata": {},
    }
    body = lora_sft_request(oid, dataset, model=model)
    return world.client.post("/post_training/supervised_fine_tune/", json=body, headers=ALPHA)


def _create_model(world: World, oid: str) -> httpx.Response:
    """Alpha registers a checkpoint of one of its own jobs under `oid`."""
    checkpoint = job_checkpoint_dir(world.home / "checkpoints", "alpha", f"job-{oid}")
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "config.json").write_text("{}")
    body = {"name": oid, "checkpoint_dir": str(checkpoint)}
    return world.client.post("/models/register", json=body, headers=ALPHA)


def _create_reward_model(world: World, oid: str) -> httpx.Response:
    """Alpha registers a one-label reward model of one of its own jobs under `oid`."""
    checkpoint = job_checkpoint_dir(world.home / "checkpoints", "alpha", f"job-{oid}")
    checkpoint.mkdir(parents=True, exist_ok=True)
    (checkpoint / "config.json").write_text('{"id2label": {"0": "reward"}}')
    body = {"name": oid, "kind": "reward", "checkpoint_dir": str(checkpoint)}
    return world.client.post("/models/register", json=body, headers=ALPHA)


def _create_agent(world: World, oid: str) -> httpx.Response:
    """Alpha's agent runs on alpha's own registered chat model."""
    model = _object(world, "chat_model", fresh=False)
    body = {
        "uuid": oid,
        "instructions": "be brief",
        "model": model,
        "available_tools": [],
        "executable_tools": [],
        "memory_bank_uuids": [],
        "input_shields": [],
        "output_shields": [],
    }
    return world.client.post("/agentic_system/create", json=body, headers=ALPHA)


# Alpha's bank holds one document (base64 of "alpha's notes on tenants").
BANK_DOCUMENT = {
    "uuid": "notes",
    "content": "YWxwaGEncyBub3RlcyBvbiB0ZW5hbnRz",
    "metadata": {"owner": "alpha"},
    "mime_type": "text/plain",
}


def _create_bank(world: World, oid: str) -> httpx.Response:
    params = {"bank_uuid": oid, "bank_name": f"bank-{oid}"}
    return world.client.post(
        "/memory_banks/create", params=params, json=[BANK_DOCUMENT], headers=ALPHA
    )


def _bank_witness(world: World, oid: str) -> Any:
    settings = world.client.get("/memory_banks/settings", params={"bank_uuid": oid}, headers=ALPHA)
    documents = world.client.post(
        "/memory_bank/get", params={"bank_uuid": oid}, json=[BANK_DOCUMENT["uuid"]], headers=ALPHA
    )
    return settings.status_code, settings.json(), documents.status_code, documents.text


def _agent_witness(world: World, oid: str) -> Any:
    """What alpha's agent answers (the scripted engine's reply: deterministic)."""
    body = {"agent_uuid": oid, "messages": [_message("hi")], "turn_history": [], "stream": False}
    response = world.client.post("/agentic_system/execute", json=body, headers=ALPHA)
    if response.status_code != 200:
        return response.status_code, response.text
    return response.status_code, response.json()["turn"]["response_message"]


def _get(path: str, param: str) -> Callable[[World, str], Any]:
    def witness(world: World, oid: str) -> Any:
        response = world.client.get(path, params={param: oid}, headers=ALPHA)
        return response.status_code, response.json()

    return witness


def _model_witness(world: World, oid: str) -> Any:
    listed = world.client.get("/models", headers=ALPHA).json()["data"]
    return [m for m in listed if m["name"] == oid]


def _unimplemented_witness(world: World, oid: str) -> Any:
    return None


KINDS: dict[str, Kind] = {
    "dataset": Kind(
        ("POST /datasets/create",), _create_dataset, _get("/datasets/get", "dataset_id")
    ),
    "job": Kind(
        ("POST /post_training/supervised_fine_tune/", "POST /post_training/preference_optimize/"),
        _create_job,
        _get("/post_training/job", "job_uuid"),
    ),
    # The spec's inference routes take only spec model names, so alpha registers its
    # models under two of them; the other two stay unused (there are no file models).
    "chat_model": Kind(
        ("POST /models/register",), _create_model, _model_witness, True, "llama3_70b_chat"
    ),
    "model": Kind(("POST /models/register",), _create_model, _model_witness, True, "llama3_70b"),
    # The spec's one reward model name, registered by alpha (no file model answers it).
    "reward_model": Kind(
        ("POST /models/register",),
        _create_reward_model,
        _model_witness,
        True,
        "llama3_405b_reward",
    ),
    "agent": Kind(("POST /agentic_system/create",), _create_agent, _agent_witness),
    "bank": Kind(
        ("POST /memory_banks/create", "POST /memory_banks/configure"), _create_bank, _bank_witness
    ),
}


# ------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class Route:
    """One route naming an object of `kind`. `call(id, world)` is the request; `listing`
    (list routes) reads the ids out of the body. `fresh`: alpha's own call changes or
    removes the object, so the row gets an object of its own. `beta_status`: what beta
    gets, the same as for an id nobody has used (alpha's own call is made, and must
    succeed, only where that is 404)."""

    route: str
    kind: str
    call: Callable[[str, World], Call]
    listing: Callable[[Any], list[str]] | None = None
    fresh: bool = False
    beta_status: int = 404
    marks: tuple[Any, ...] = ()
    # An id nobody has, where ids must be spec model names (default: a made-up one).
    unused: str | None = None


def _query(method: str, path: str, param: str) -> Callable[[str, World], Call]:
    return lambda oid, world: (method, path, {"params": {param: oid}})


def _json(path: str, make: Callable[[str], Any]) -> Callable[[str, World], Call]:
    return lambda oid, world: ("POST", path, {"json": make(oid)})


def _plain(method: str, path: str) -> Callable[[str, World], Call]:
    return lambda oid, world: (method, path, {})


def _path(method: str, template: str) -> Callable[[str, World], Call]:
    return lambda oid, world: (method, template.format(oid), {})


def _bank(path: str) -> Callable[[str, World], Call]:
    return lambda oid, world: ("POST", path, {"params": {"bank_uuid": oid}, "json": []})


def _ids(key: str) -> Callable[[Any], list[str]]:
    return lambda body: [item[key] for item in body["data"]]


def _lines(key: str) -> Callable[[Any], list[str]]:
    """Ids out of an `application/jsonl` list (read by `_body`)."""
    return lambda body: [item[key] for item in body]


def _body(response: httpx.Response) -> Any:
    if response.headers.get("content-type", "").startswith("application/jsonl"):
        return [json.loads(line) for line in response.text.splitlines()]
    return response.json()


def _register_from_job(oid: str, world: World) -> Call:
    """Beta registers a shared checkpoint, naming alpha's job as its source."""
    body = {"name": "borrowed", "checkpoint_dir": str(world.shared_dir), "source_job_uuid": oid}
    return "POST", "/models/register", {"json": body}


ROUTES: list[Route] = [
    # datasets
    Route("GET /datasets/get", "dataset", _query("GET", "/datasets/get", "dataset_id")),
    Route(
        "DELETE /datasets/delete",
        "dataset",
        _query("DELETE", "/datasets/delete", "dataset_id"),
        fresh=True,
    ),
    # post-training jobs: the spec's routes and Corral's own
    Route(
        "GET /post_training/job/status",
        "job",
        _query("GET", "/post_training/job/status", "job_uuid"),
    ),
    Route(
        "GET /post_training/job/logs", "job", _query("GET", "/post_training/job/logs", "job_uuid")
    ),
    Route(
        "GET /post_training/job/artifacts",
        "job",
        _query("GET", "/post_training/job/artifacts", "job_uuid"),
    ),
    Route("GET /post_training/job", "job", _query("GET", "/post_training/job", "job_uuid")),
    Route(
        "POST /post_training/job/cancel",
        "job",
        _json("/post_training/job/cancel", lambda oid: {"job_uuid": oid}),
        fresh=True,
    ),
    Route("GET /post_training/jobs", "job", _plain("GET", "/post_training/jobs"), _ids("job_uuid")),
    Route(
        "GET /post_training/job/metrics",
        "job",
        _query("GET", "/post_training/job/metrics", "job_uuid"),
    ),
    # Corral's routes for jobs of every kind
    Route("GET /jobs", "job", _plain("GET", "/jobs"), _ids("job_uuid")),
    Route("GET /jobs/{job_uuid}", "job", _path("GET", "/jobs/{}")),
    Route("GET /jobs/{job_uuid}/logs", "job", _path("GET", "/jobs/{}/logs")),
    Route("GET /jobs/{job_uuid}/metrics", "job", _path("GET", "/jobs/{}/metrics")),
    Route("POST /jobs/{job_uuid}/cancel", "job", _path("POST", "/jobs/{}/cancel"), fresh=True),
    # models: Corral's routes, the OpenAI-compatible ones and the spec's inference
    Route("GET /models", "chat_model", _plain("GET", "/models"), _ids("name")),
    Route(
        "POST /models/scale",
        "chat_model",
        _json("/models/scale", lambda oid: {"model": oid, "min_replicas": 1, "max_replicas": 1}),
    ),
    Route(
        "DELETE /models/delete", "model", _query("DELETE", "/models/delete", "model"), fresh=True
    ),
    Route("POST /models/register", "job", _register_from_job, beta_status=422),
    Route("GET /v1/models", "chat_model", _plain("GET", "/v1/models"), _ids("id")),
    Route(
        "GET /v1/models/{model}",
        "chat_model",
        lambda oid, world: ("GET", f"/v1/models/{oid}", {}),
    ),
    Route(
        "POST /v1/chat/completions",
        "chat_model",
        _json("/v1/chat/completions", lambda oid: OPENAI_CHAT | {"model": oid}),
    ),
    Route(
        "POST /v1/completions",
        "model",
        _json("/v1/completions", lambda oid: {"model": oid, "prompt": "hi", "max_tokens": 2}),
    ),
    Route(
        "POST /inference/chat_completion",
        "chat_model",
        _json("/inference/chat_completion", _chat),
        unused="llama3_8b_chat",
    ),
    Route(
        "POST /inference/batch_chat_completion",
        "chat_model",
        _json("/inference/batch_chat_completion", _batch_chat),
        unused="llama3_8b_chat",
    ),
    Route(
        "POST /inference/completion",
        "model",
        _json("/inference/completion", _completion),
        unused="llama3_8b",
    ),
    Route(
        "POST /inference/batch_completion",
        "model",
        _json("/inference/batch_completion", _batch_completion),
        unused="llama3_8b",
    ),
    # The only spec name is alpha's: beta's "unused" call is the same call.
    Route(
        "POST /reward_scoring/score",
        "reward_model",
        _json("/reward_scoring/score", _score),
        unused="llama3_405b_reward",
    ),
    # agents: alpha's agent on alpha's registered chat model
    Route(
        "POST /agentic_system/execute",
        "agent",
        _json(
            "/agentic_system/execute",
            lambda oid: {
                "agent_uuid": oid,
                "messages": [_message("hi")],
                "turn_history": [],
                "stream": False,
            },
        ),
    ),
    Route(
        "DELETE /agentic_system/delete",
        "agent",
        _query("DELETE", "/agentic_system/delete", "agent_id"),
        fresh=True,
    ),
    # memory banks: the spec's routes and Corral's own
    Route("GET /memory_banks/get", "bank", _plain("GET", "/memory_banks/get"), _lines("uuid")),
    Route(
        "DELETE /memory_banks/drop",
        "bank",
        _query("DELETE", "/memory_banks/drop", "bank_uuid"),
        fresh=True,
    ),
    Route("POST /memory_bank/insert", "bank", _bank("/memory_bank/insert")),
    Route("POST /memory_bank/update", "bank", _bank("/memory_bank/update")),
    Route("POST /memory_bank/delete", "bank", _bank("/memory_bank/delete")),
    Route("POST /memory_bank/get", "bank", _bank("/memory_bank/get")),
    Route(
        "GET /memory_banks/settings", "bank", _query("GET", "/memory_banks/settings", "bank_uuid")
    ),
    Route(
        "POST /memory_bank/query",
        "bank",
        _json("/memory_bank/query", lambda oid: {"bank_uuid": oid, "query": "notes"}),
    ),
    # synthetic data: alpha's registered model is no model at all to beta (422 as for a
    # name nobody registered; alpha's own call would need a reward model too)
    Route(
        "POST /synthetic_data_generation/generate",
        "chat_model",
        _json("/synthetic_data_generation/generate", _generation),
        beta_status=422,
        unused="llama3_8b_chat",
    ),
    Route(
        "POST /synthetic_data_generation/jobs",
        "chat_model",
        _json(
            "/synthetic_data_generation/jobs",
            lambda oid: _generation(oid) | {"job_uuid": f"sdg-{oid}"},
        ),
        beta_status=422,
        unused="llama3_8b_chat",
    ),
]

# Routes of the app that name no stored object of a tenant, and why.
# The running jobs' routes take a job token, not a tenant's key (no key opens them):
# tests/api/test_internal_jobs.py checks that job A's token opens none of job B's.
INTERNAL_JOB_ROUTES = {
    f"{method} /internal/jobs/{{job_key}}/{name}": "job token, not a tenant key"
    for method, name in [
        ("GET", "launch"),
        ("GET", "status"),
        ("GET", "checkpoints"),
        ("POST", "checkpoints"),
        ("POST", "transition"),
        ("POST", "logs"),
        ("POST", "metrics"),
        ("POST", "plan"),
        ("POST", "dataset"),
    ]
}
NOT_ID_ROUTES = {
    "GET /health": "no object",
    "GET /ready": "no object: the backends' state, the same for every caller",
    "GET /metrics": "operators only; counts, never a tenant's object (tests/api/test_ops.py)",
    # The jobs dashboard: a static page and its files, the sign-in form, and who the
    # session is (the page reads jobs through the job routes above, which a session
    # cookie may read: see test_a_dashboard_session_of_beta_sees_no_more_than_its_key).
    "GET /dashboard": "no object: a static page",
    "GET /dashboard/static/{name}": "no object: the page's script and stylesheet",
    "GET /dashboard/session": "no object: the caller's own tenant",
    "GET /dashboard/login": "no object: the sign-in form",
    "POST /dashboard/login": "no object: signs in",
    "POST /dashboard/logout": "no object: signs out",
    **INTERNAL_JOB_ROUTES,
}


# ------------------------------------------------------------------ the app


@pytest.fixture(scope="module")
def world(
    serve_instance: None,
    embedding_app: Any,
    milvus_uri: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    """One app for the module: SQLite, a real registry on the session's Serve whose one
    file model is the session's embedding app (alpha's registered models run the
    scripted engine), memory banks on the session's Milvus Lite server, and a recording
    launcher."""
    home = tmp_path_factory.mktemp("tenant-matrix") / "home"
    base = home / "models" / "base"
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    url = f"sqlite:///{home.parent / 'corral.db'}"
    migrate.upgrade(url)
    database = Database(url)
    # No periodic reconciliation during the module: alpha's witnesses must hold still.
    settings = Settings(
        home=home,
        api_keys=API_KEYS,
        reconcile_interval_s=3600,
        memory_embedding_model=embedding_app.name,
    )
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(deploy_timeout_s=60),
        file_models=[embedding_app.spec],
        model_roots=model_roots(settings),
        engine_factory=partial(scripted_engines, ScriptedEngineConfig("scripted reply")),
        registration_defaults=ReplicaOptions(cpus_per_replica=0.25),
    )
    index = MilvusIndex(milvus_uri)
    app = create_app(
        settings,
        database=database,
        models=registry,
        launcher=RecordingLauncher(),
        vector_index=index,
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            yield World(client=client, home=home, shared_dir=base, token=uuid.uuid4().hex[:8])
    finally:
        for listed in registry.list("alpha"):
            if listed.name == embedding_app.name:
                continue  # the session's, not the module's
            serve.delete(tenant_app_name("alpha", listed.name), _blocking=False)
        index.close()
        database.dispose()


def _new_object(world: World, kind_name: str, oid: str | None = None) -> str:
    kind = KINDS[kind_name]
    if oid is None:
        taken = world.used.get(kind_name, 0)
        world.used[kind_name] = taken + 1
        oid = f"{kind_name}-{world.token}-{taken}"
    response = kind.create(world, oid)
    expected = 200 if kind.implemented else 501
    assert response.status_code == expected, (
        f"creating a {kind_name} answered {response.status_code}, expected {expected}"
        + ("" if kind.implemented else ": the area works now, mark its kind implemented")
        + f": {response.text[:300]}"
    )
    return oid


def _object(world: World, kind_name: str, *, fresh: bool) -> str:
    if fresh:
        return _new_object(world, kind_name)
    if kind_name not in world.objects:
        world.objects[kind_name] = _new_object(world, kind_name, KINDS[kind_name].shared_id)
    return world.objects[kind_name]


def _answer(response: httpx.Response, oid: str) -> tuple[int, str]:
    """Status and body with the id blanked out, to compare answers about two ids."""
    return response.status_code, response.text.replace(oid, "<id>")


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize(
    "row", [pytest.param(row, id=row.route, marks=row.marks) for row in ROUTES]
)
def test_beta_never_sees_nor_changes_alphas_object(world: World, row: Route) -> None:
    _check_row(world, row, BETA)


def _session_of(world: World, key: str) -> Headers:
    """A dashboard session cookie for `key`, signed in through the form (the client's
    jar is left empty: every other call of the module names its caller itself)."""
    response = world.client.post("/dashboard/login", data={"api_key": key}, follow_redirects=False)
    assert response.status_code == 303, response.text
    world.client.cookies.clear()
    return {"Cookie": f"{COOKIE_NAME}={response.cookies[COOKIE_NAME]}"}


# The routes whose answers the dashboard page reads with its session cookie.
SESSION_ROUTES = [row for row in ROUTES if cookie_may_authenticate(*row.route.split(" ", 1))]


@pytest.mark.parametrize("row", [pytest.param(row, id=row.route) for row in SESSION_ROUTES])
def test_a_dashboard_session_of_beta_sees_no_more_than_its_key(world: World, row: Route) -> None:
    _check_row(world, row, _session_of(world, "key-beta"))


def test_the_dashboard_reads_every_job_route_it_needs() -> None:
    assert {row.route for row in SESSION_ROUTES} == {
        "GET /jobs",
        "GET /jobs/{job_uuid}",
        "GET /jobs/{job_uuid}/logs",
        "GET /jobs/{job_uuid}/metrics",
        "GET /post_training/job/artifacts",
    }


def _check_row(world: World, row: Route, beta: Headers) -> None:
    kind = KINDS[row.kind]
    oid = _object(world, row.kind, fresh=row.fresh)
    nobody = row.unused or f"nobody{world.token}"
    before = kind.witness(world, oid)

    theirs = world.call(row.call(oid, world), beta)
    unused = world.call(row.call(nobody, world), beta)

    assert kind.witness(world, oid) == before, "beta's call changed alpha's object"
    if not kind.implemented:
        mine = world.call(row.call(oid, world), ALPHA)
        assert theirs.status_code in (404, 501), theirs.text
        assert _answer(theirs, oid) == _answer(unused, nobody) == _answer(mine, oid)
        return
    if row.listing is not None:
        assert theirs.status_code == 200, theirs.text
        assert oid not in row.listing(_body(theirs))
        assert oid in row.listing(_body(world.call(row.call(oid, world), ALPHA)))
        return
    assert theirs.status_code == row.beta_status, theirs.text
    assert _answer(theirs, oid) == _answer(unused, nobody), "beta can tell the id is taken"
    if row.beta_status == 404:
        mine = world.call(row.call(oid, world), ALPHA)
        assert 200 <= mine.status_code < 300, f"alpha's own call failed: {mine.text[:300]}"


def _app_routes(routes: Iterable[Any], prefix: str = "") -> set[str]:
    """Every API route as "METHOD /path", hidden ones (/v1) included. FastAPI 0.165 keeps
    an included router as one entry holding the router and its include prefix."""
    found: set[str] = set()
    for route in routes:
        if isinstance(route, APIRoute):
            found |= {f"{method} {prefix}{route.path}" for method in route.methods}
        elif hasattr(route, "original_router"):
            context = getattr(route, "include_context", None)
            nested = prefix + (getattr(context, "prefix", "") or "")
            found |= _app_routes(route.original_router.routes, nested)
    return found


def test_every_route_is_in_the_matrix(tmp_path: Path) -> None:
    routes = _app_routes(create_app(Settings(home=tmp_path)).routes)
    assert "GET /v1/models/{model}" in routes and "GET /datasets/get" in routes
    creators = {creator for kind in KINDS.values() for creator in kind.creators}
    covered = {row.route for row in ROUTES} | creators | set(NOT_ID_ROUTES)
    assert sorted(routes - covered) == [], "add these routes to ROUTES (or NOT_ID_ROUTES)"
    assert sorted(covered - routes) == [], "the matrix lists routes the app does not have"
    assert len({row.route for row in ROUTES}) == len(ROUTES), "one row per route"
    assert {row.kind for row in ROUTES} <= set(KINDS)
