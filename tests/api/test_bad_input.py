"""Bad input never gets a 5xx, on both database backends: every id-taking field on every
route (query parameters and body fields) refuses NUL, other control characters, lone
surrogates and over-long values with a 422 that names the field; deeply nested JSON (in
a request or a dataset's json, jsonl or csv content) is a 422, not a RecursionError."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.api.common import MAX_ID_LENGTH, MAX_JSON_DEPTH
from corral.app import create_app, fetch_policy
from corral.config import Settings
from corral.content import ContentFetcher
from corral.services.models import build_model_service
from corral.serving.catalog import model_roots
from corral.serving.deployer import ServeDeployer
from corral.store import migrate
from corral.store.db import Database
from tests.api.conftest import ALPHA, API_KEYS
from tests.conftest import _reset_postgres

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestClient]:
    """One app per backend for the whole module (bad input writes nothing, so the cases
    share it), with a real model registry (not started) so that the /models routes
    validate their input instead of answering 501."""
    home = tmp_path_factory.mktemp("bad-input")
    if request.param == "sqlite":
        url = f"sqlite:///{home / 'corral.db'}"
    else:
        url = request.getfixturevalue("postgres_server")
        _reset_postgres(url)
    migrate.upgrade(url)
    database = Database(url)
    settings = Settings(home=home / "home", api_keys=API_KEYS, dataset_roots=str(home))
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=[],
        model_roots=model_roots(settings),
    )
    app = create_app(
        settings,
        database=database,
        fetcher=ContentFetcher(fetch_policy(settings)),
        models=registry,
    )
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        database.dispose()


# Every route and field is tried with these; the other kinds of bad value are tried on
# one query parameter and one body field (the same type checks them all).
QUERY_BAD = {"nul": "ds\x00x", "too long": "x" * (MAX_ID_LENGTH + 1)}
BODY_BAD = {**QUERY_BAD, "lone surrogate": "ds\ud800x"}
# Spelled in a query string too (a lone surrogate cannot be: it has no UTF-8 form).
MORE_BAD = {"escape": "ds\x1bx", "delete": "ds\x7fx", "c1 control": "ds\x85x", "empty": ""}

DATASET = {"columns": {"text": "text"}, "content_url": "data:,x", "metadata": {}}
MESSAGE = {"role": "user", "content": "hi", "tool_calls": [], "tool_responses": []}
DOCUMENT = {"uuid": "doc-1", "content": "aGk=", "metadata": {}, "mime_type": "text/plain"}

# (method, path, where the id goes, its name): "query", "path" or a body builder.
QUERY_IDS = [
    ("GET", "/datasets/get", "dataset_id"),
    ("DELETE", "/datasets/delete", "dataset_id"),
    ("GET", "/post_training/job/status", "job_uuid"),
    ("GET", "/post_training/job/logs", "job_uuid"),
    ("GET", "/post_training/job/artifacts", "job_uuid"),
    ("GET", "/post_training/job", "job_uuid"),
    ("DELETE", "/agentic_system/delete", "agent_id"),
    ("DELETE", "/memory_banks/drop", "bank_uuid"),
    ("POST", "/memory_banks/create", "bank_uuid"),
    ("POST", "/memory_banks/create", "bank_name"),
    ("POST", "/memory_bank/insert", "bank_uuid"),
    ("POST", "/memory_bank/update", "bank_uuid"),
    ("POST", "/memory_bank/delete", "bank_uuid"),
    ("POST", "/memory_bank/get", "bank_uuid"),
    ("DELETE", "/models/delete", "model"),
]
QUERY_DEFAULTS: dict[str, Any] = {"bank_uuid": "bank", "bank_name": "bank"}
# The JSON bodies the memory bank routes take besides their query parameters.
QUERY_ROUTE_BODIES: dict[str, Any] = {
    "/memory_banks/create": [DOCUMENT],
    "/memory_bank/insert": [DOCUMENT],
    "/memory_bank/update": [DOCUMENT],
    "/memory_bank/delete": ["doc-1"],
    "/memory_bank/get": ["doc-1"],
}


def _sft(bad: str) -> dict[str, Any]:
    return {"job_uuid": bad, "model": "llama3_8b", "dataset": DATASET}


BODY_IDS: list[tuple[str, Any, list[str | int]]] = [
    ("/datasets/create", lambda bad: {"uuid": bad, "dataset": DATASET}, ["uuid"]),
    ("/post_training/supervised_fine_tune/", _sft, ["job_uuid"]),
    ("/post_training/preference_optimize/", _sft, ["job_uuid"]),
    ("/post_training/job/cancel", lambda bad: {"job_uuid": bad}, ["job_uuid"]),
    ("/agentic_system/create", lambda bad: {"uuid": bad}, ["uuid"]),
    (
        "/agentic_system/create",
        lambda bad: {"uuid": "a", "memory_bank_uuids": ["ok", bad]},
        ["memory_bank_uuids", 1],
    ),
    ("/agentic_system/execute", lambda bad: {"agent_uuid": bad}, ["agent_uuid"]),
    (
        "/agentic_system/execute",
        lambda bad: {
            "agent_uuid": "a",
            "messages": [],
            "stream": False,
            "turn_history": [
                {
                    "user_messages": [],
                    "response_message": MESSAGE,
                    "steps": [{"step_type": "model_inference", "uuid": bad, "text": "t"}],
                }
            ],
        },
        ["turn_history", 0, "steps", 0, "model_inference", "uuid"],
    ),
    ("/models/scale", lambda bad: {"model": bad, "replicas": 1}, ["model"]),
    (
        "/models/register",
        lambda bad: {"name": "m", "checkpoint_dir": "/x", "source_job_uuid": bad},
        ["source_job_uuid"],
    ),
]
# Document ids are free-form in the spec, but printable and bounded all the same.
MEMORY_BODY_IDS: list[tuple[str, Any, list[str | int]]] = [
    ("/memory_bank/insert", lambda bad: [{**DOCUMENT, "uuid": bad}], [0, "uuid"]),
    ("/memory_bank/update", lambda bad: [{**DOCUMENT, "uuid": bad}], [0, "uuid"]),
    ("/memory_bank/delete", lambda bad: ["ok", bad], [1]),
    ("/memory_bank/get", lambda bad: ["ok", bad], [1]),
]


def _post_json(client: TestClient, path: str, body: Any, **kwargs: Any) -> Any:
    """POST `body` as ASCII JSON: `\\ud800` escapes a lone surrogate that UTF-8 cannot."""
    headers = {**ALPHA, "Content-Type": "application/json"}
    return client.post(path, content=json.dumps(body), headers=headers, **kwargs)


def _refused(response: Any, location: list[str]) -> None:
    assert response.status_code == 422, response.text
    problems = response.json()["error"]["problems"]
    assert location in [problem["location"] for problem in problems], problems


@pytest.mark.parametrize("bad", list(QUERY_BAD), ids=str)
@pytest.mark.parametrize("route", QUERY_IDS, ids=lambda r: f"{r[0]} {r[1]} {r[2]}")
def test_query_ids_refuse_bad_values(
    client: TestClient, route: tuple[str, str, str], bad: str
) -> None:
    method, path, name = route
    params = {**{k: v for k, v in QUERY_DEFAULTS.items() if path.startswith("/memory")}}
    params[name] = QUERY_BAD[bad]
    body = QUERY_ROUTE_BODIES.get(path)
    response = client.request(
        method, path, params=params, headers=ALPHA, json=body if body is not None else None
    )
    _refused(response, ["query", name])


@pytest.mark.parametrize("bad", list(BODY_BAD), ids=str)
@pytest.mark.parametrize(
    "route", BODY_IDS, ids=lambda r: f"{r[0]} {'.'.join(str(p) for p in r[2])}"
)
def test_body_ids_refuse_bad_values(
    client: TestClient, route: tuple[str, Any, list[str | int]], bad: str
) -> None:
    path, build, location = route
    response = _post_json(client, path, build(BODY_BAD[bad]))
    _refused(response, ["body", *(str(part) for part in location)])


@pytest.mark.parametrize("bad", list(BODY_BAD), ids=str)
@pytest.mark.parametrize(
    "route", MEMORY_BODY_IDS, ids=lambda r: f"{r[0]} {'.'.join(str(p) for p in r[2])}"
)
def test_document_ids_refuse_bad_values(
    client: TestClient, route: tuple[str, Any, list[str | int]], bad: str
) -> None:
    path, build, location = route
    response = _post_json(client, path, build(BODY_BAD[bad]), params={"bank_uuid": "bank"})
    _refused(response, ["body", *(str(part) for part in location)])


@pytest.mark.parametrize("bad", ["m\x00x", "m\x1bx", "m" * (MAX_ID_LENGTH + 1)])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_openai_model_names_refuse_bad_values(client: TestClient, path: str, bad: str) -> None:
    body = {"model": bad, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    response = client.post(path, json=body, headers=ALPHA)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "model"


@pytest.mark.parametrize("bad", ["m%00x", "m%1Bx", "m" * (MAX_ID_LENGTH + 1)])
def test_openai_model_path_refuses_bad_values(client: TestClient, bad: str) -> None:
    response = client.get(f"/v1/models/{bad}", headers=ALPHA)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "model"


@pytest.mark.parametrize("bad", list(MORE_BAD), ids=str)
def test_every_kind_of_bad_id_is_refused(client: TestClient, bad: str) -> None:
    response = client.get("/datasets/get", params={"dataset_id": MORE_BAD[bad]}, headers=ALPHA)
    _refused(response, ["query", "dataset_id"])
    response = _post_json(client, "/post_training/job/cancel", {"job_uuid": MORE_BAD[bad]})
    _refused(response, ["body", "job_uuid"])


def test_free_form_ids_stay_free_form(client: TestClient) -> None:
    """Printable ids the strict alphabet would refuse still reach the service: a spec id
    such as a dataset to look up may be any printable text."""
    for value in ["ünïcode id", "a/b?c", "x" * MAX_ID_LENGTH]:
        response = client.get("/datasets/get", params={"dataset_id": value}, headers=ALPHA)
        assert response.status_code == 404, response.text


def test_a_strict_id_still_refuses_what_cannot_become_a_ray_id(client: TestClient) -> None:
    response = client.post(
        "/datasets/create", json={"uuid": "has space", "dataset": DATASET}, headers=ALPHA
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


# ---------------------------------------------------------------- deeply nested JSON


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _data_url(text: str) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(text.encode()).decode()


# Depth 100000 makes `json` raise RecursionError; 300 passes `json` but not pydantic's
# serializer (255); MAX_JSON_DEPTH + 1 is the first depth refused on purpose.
DEPTHS = [100_000, 300, MAX_JSON_DEPTH + 1]


def _content(fmt: str, cell: str) -> str:
    if fmt == "json":
        return '[{"cell": ' + cell + "}]"
    if fmt == "jsonl":
        return '{"cell": ' + cell + "}\n"
    return "cell\n" + json.dumps(cell) + "\n"  # csv: the cell carries JSON text


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["json", "dialog"])
@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_deeply_nested_dataset_content_is_a_422(
    client: TestClient, fmt: str, kind: str, depth: int
) -> None:
    # The csv reader has its own field limit (128 KiB); stay under it so the JSON is read.
    cell = _nested(min(depth, 50_000) if fmt == "csv" else depth)
    dataset = {
        "columns": {"cell": kind},
        "content_url": _data_url(_content(fmt, cell)),
        "metadata": {"format": fmt},
    }
    response = client.post(
        "/datasets/create", json={"uuid": "deep", "dataset": dataset}, headers=ALPHA
    )
    assert response.status_code == 422, response.text
    assert "levels deep" in response.json()["error"]["message"]
    assert (
        client.get("/datasets/get", params={"dataset_id": "deep"}, headers=ALPHA).status_code == 404
    )


def test_json_nested_to_the_limit_is_accepted(client: TestClient) -> None:
    # The row object is one level, so its cell may nest one less.
    cell = _nested(MAX_JSON_DEPTH - 1)
    dataset = {
        "columns": {"cell": "json"},
        "content_url": _data_url(_content("jsonl", cell)),
        "metadata": {"format": "jsonl", "nested": json.loads(_nested(MAX_JSON_DEPTH))},
    }
    response = client.post(
        "/datasets/create", json={"uuid": "at-the-limit", "dataset": dataset}, headers=ALPHA
    )
    assert response.status_code == 200, response.text
    stored = client.get(
        "/datasets/get", params={"dataset_id": "at-the-limit"}, headers=ALPHA
    ).json()
    assert stored["metadata"]["nested"] == json.loads(_nested(MAX_JSON_DEPTH))


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 900])
def test_deeply_nested_request_json_is_a_422(client: TestClient, depth: int) -> None:
    body = {"uuid": "deep", "dataset": {**DATASET, "metadata": {"a": json.loads(_nested(depth))}}}
    response = client.post("/datasets/create", json=body, headers=ALPHA)
    _refused(response, ["body", "dataset", "metadata", "a"])


def test_json_too_deep_to_parse_is_a_4xx(client: TestClient) -> None:
    body = '{"uuid": "deep", "dataset": {"metadata": {"a": ' + _nested(100_000) + "}}}"
    response = client.post(
        "/datasets/create",
        content=body,
        headers={**ALPHA, "Content-Type": "application/json"},
    )
    assert 400 <= response.status_code < 500, response.text


# ---------------------------------------------------------------- found by the fuzzer


@pytest.mark.parametrize("offset", [2**63, 2**64 + 1])
def test_a_page_offset_past_any_database_integer_is_a_422(client: TestClient, offset: int) -> None:
    """SQLite raised OverflowError on an offset of 2**63 (a 500)."""
    response = client.get("/post_training/jobs", params={"offset": offset}, headers=ALPHA)
    _refused(response, ["query", "offset"])


def test_the_largest_page_offset_is_an_empty_page(client: TestClient) -> None:
    from corral.routes.jobs import MAX_OFFSET

    response = client.get("/post_training/jobs", params={"offset": MAX_OFFSET}, headers=ALPHA)
    assert response.status_code == 200, response.text
    assert response.json()["data"] == []
