"""Memory banks through HTTP only, on both SQL backends, a real Milvus Lite server
(`vector_index`) and the real all-MiniLM-L6-v2 embedding app on the session's Serve
(`embedding_app`): the seven spec operations, Corral's configure / settings / query
routes, idempotency and 409s, updates that never leave a document without chunks, writes
that fail leaving nothing behind, and tenants that cannot see each other's banks."""

from __future__ import annotations

import base64
import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from corral.app import create_app
from corral.config import Settings
from corral.services import memory_banks as memory_service
from corral.services.models import build_model_service
from corral.serving.catalog import ModelSpec, model_roots
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.store.memory_banks import MemoryBankStore
from corral.vector_index import ChunkRecord, MilvusIndex
from tests.api.conftest import ALPHA, API_KEYS, BETA

pytestmark = [pytest.mark.integration]

LLM = "not-an-embedder"  # a file model of another kind (never deployed: 422 comes first)


def doc(uuid: str, text: str, *, mime: str = "text/plain", **metadata: Any) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "content": base64.b64encode(text.encode()).decode(),
        "metadata": metadata,
        "mime_type": mime,
    }


def jsonl(response: httpx.Response) -> list[Any]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/jsonl")
    return [json.loads(line) for line in response.text.splitlines()]


PARIS = "The capital of France is Paris, a city on the Seine known for the Eiffel Tower."
TOKYO = "Tokyo is the capital of Japan and the most populous metropolitan area on Earth."
PYTHON = "Python lists are mutable sequences; tuples are their immutable counterparts."


# The service's SQL is the store's (tested on both databases in tests/store): most tests
# here run on SQLite only; the round trip, update and failure paths run on both.
SQLITE_ONLY = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


@pytest.fixture
def app_parts(
    embedding_app: Any, vector_index: MilvusIndex, database: Database, tmp_path: Path
) -> Iterator[tuple[TestClient, MilvusIndex, Database]]:
    settings = Settings(
        home=tmp_path / "home", api_keys=API_KEYS, memory_embedding_model=embedding_app.name
    )
    llm_dir = tmp_path / "llm"
    llm_dir.mkdir()
    (llm_dir / "config.json").write_text("{}")
    registry = build_model_service(
        database=database,
        deployer=ServeDeployer(),
        file_models=[embedding_app.spec, ModelSpec(name=LLM, checkpoint_dir=llm_dir)],
        model_roots=model_roots(settings),
    )
    app = create_app(settings, database=database, models=registry, vector_index=vector_index)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, vector_index, database


@pytest.fixture
def client(app_parts: tuple[TestClient, MilvusIndex, Database]) -> TestClient:
    return app_parts[0]


def create(client: TestClient, bank: str, docs: list[dict[str, Any]], *, name: str = "notes",
           headers: dict[str, str] = ALPHA) -> httpx.Response:  # fmt: skip
    params = {"bank_uuid": bank, "bank_name": name}
    return client.post("/memory_banks/create", params=params, json=docs, headers=headers)


def post(client: TestClient, path: str, bank: str, body: Any,
         headers: dict[str, str] = ALPHA) -> httpx.Response:  # fmt: skip
    return client.post(path, params={"bank_uuid": bank}, json=body, headers=headers)


def query(client: TestClient, bank: str, text: str, headers: dict[str, str] = ALPHA,
          **extra: Any) -> httpx.Response:  # fmt: skip
    body = {"bank_uuid": bank, "query": text, **extra}
    return client.post("/memory_bank/query", json=body, headers=headers)


def chunks(client: TestClient, bank: str, text: str, **extra: Any) -> list[dict[str, Any]]:
    response = query(client, bank, text, **extra)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["chunks"]
    return found


def collection_of(database: Database, bank: str, tenant: str = "alpha") -> str:
    with database.transaction() as session:
        row = MemoryBankStore(session).get(tenant=tenant, uuid=bank)
        assert row is not None
        return row.collection


# ------------------------------------------------------------------ the operations


def test_create_list_get_query_round_trip(client: TestClient) -> None:
    docs = [
        doc("paris", PARIS, topic="geo"),
        doc("python", "# Lists\n\n" + PYTHON, mime="text/markdown", topic="code"),
        doc("tokyo", f"<html><script>alert('x')</script><p>{TOKYO}</p></html>", mime="text/html"),
    ]
    assert create(client, "kb", docs).status_code == 200
    assert jsonl(client.get("/memory_banks/get", headers=ALPHA)) == [
        {"uuid": "kb", "name": "notes"}
    ]
    # The originals, exactly as sent, in the order asked.
    got = jsonl(post(client, "/memory_bank/get", "kb", ["tokyo", "paris"]))
    assert got == [docs[2], docs[0]]

    found = chunks(client, "kb", "What is the capital of France?", top_k=3)
    assert found[0]["document_uuid"] == "paris"
    assert found[0]["chunk_id"] == "paris:1:0"
    assert found[0]["metadata"] == {"topic": "geo"}
    assert found[0]["text"] == PARIS[found[0]["start"] : found[0]["end"]]
    assert [c["score"] for c in found] == sorted((c["score"] for c in found), reverse=True)
    # HTML's script is not text: nothing retrieves it.
    html = chunks(client, "kb", "alert", mode="keyword", top_k=10)
    assert all("alert" not in c["text"] for c in html)
    # Filters and modes.
    code = chunks(client, "kb", "capital", metadata_filter={"topic": "code"}, top_k=5)
    assert {c["document_uuid"] for c in code} == {"python"}
    assert chunks(client, "kb", "Japan metropolitan", mode="keyword")[0]["document_uuid"] == (
        "tokyo"
    )
    assert chunks(client, "kb", "immutable sequences", mode="dense")[0]["document_uuid"] == (
        "python"
    )


@SQLITE_ONLY
def test_create_again_is_a_no_op_and_another_name_a_409(client: TestClient) -> None:
    docs = [doc("paris", PARIS)]
    assert create(client, "kb", docs).status_code == 200
    assert create(client, "kb", docs).status_code == 200
    assert len(chunks(client, "kb", "Paris", top_k=10)) == 1
    conflict = create(client, "kb", docs, name="other")
    assert conflict.status_code == 409, conflict.text
    assert jsonl(client.get("/memory_banks/get", headers=ALPHA)) == [
        {"uuid": "kb", "name": "notes"}
    ]


@SQLITE_ONLY
def test_insert_is_idempotent_and_another_document_under_a_uuid_is_a_409(
    client: TestClient,
) -> None:
    assert create(client, "kb", []).status_code == 200
    first = doc("paris", PARIS, page=1)
    assert post(client, "/memory_bank/insert", "kb", [first]).status_code == 200
    assert post(client, "/memory_bank/insert", "kb", [first, first]).status_code == 200
    assert [c["chunk_id"] for c in chunks(client, "kb", "Paris", top_k=10)] == ["paris:1:0"]

    changed = doc("paris", TOKYO, page=1)
    conflict = post(client, "/memory_bank/insert", "kb", [doc("tokyo", TOKYO), changed])
    assert conflict.status_code == 409, conflict.text
    assert "update" in conflict.json()["error"]["message"]
    # Nothing of the refused request is stored: not the new document either.
    assert jsonl(post(client, "/memory_bank/get", "kb", ["paris"])) == [first]
    assert post(client, "/memory_bank/get", "kb", ["tokyo"]).status_code == 404
    assert {c["document_uuid"] for c in chunks(client, "kb", "Japan", top_k=10)} == {"paris"}
    # Two different documents under one uuid in one request.
    twice = post(client, "/memory_bank/insert", "kb", [doc("x", "a"), doc("x", "b")])
    assert twice.status_code == 422, twice.text


def test_update_replaces_a_documents_chunks(
    app_parts: tuple[TestClient, MilvusIndex, Database],
) -> None:
    client, index, database = app_parts
    assert create(client, "kb", [doc("city", PARIS), doc("code", PYTHON)]).status_code == 200
    updated = doc("city", TOKYO, lang="en")
    assert post(client, "/memory_bank/update", "kb", [updated]).status_code == 200
    found = chunks(client, "kb", "capital city", top_k=10)
    assert {c["chunk_id"] for c in found} == {"city:2:0", "code:1:0"}
    assert all("Paris" not in c["text"] for c in found)
    assert jsonl(post(client, "/memory_bank/get", "kb", ["city"])) == [updated]
    # The old version's chunks are gone from Milvus, not only hidden.
    assert index.chunk_ids(collection_of(database, "kb"), "city") == ["city:2:0"]
    # The same document again: no new version.
    assert post(client, "/memory_bank/update", "kb", [updated]).status_code == 200
    assert index.chunk_ids(collection_of(database, "kb"), "city") == ["city:2:0"]

    missing = post(client, "/memory_bank/update", "kb", [updated, doc("nope", "x")])
    assert missing.status_code == 404, missing.text
    assert "nope" in missing.json()["error"]["message"]


@SQLITE_ONLY
def test_delete_get_and_drop(app_parts: tuple[TestClient, MilvusIndex, Database]) -> None:
    client, index, database = app_parts
    assert create(client, "kb", [doc("paris", PARIS), doc("tokyo", TOKYO)]).status_code == 200
    collection = collection_of(database, "kb")
    # Unknown ids: 404 naming them, and nothing deleted.
    unknown = post(client, "/memory_bank/delete", "kb", ["paris", "ghost"])
    assert unknown.status_code == 404 and "ghost" in unknown.text
    assert post(client, "/memory_bank/get", "kb", ["paris", "ghost"]).status_code == 404
    assert len(jsonl(post(client, "/memory_bank/get", "kb", ["paris"]))) == 1

    assert post(client, "/memory_bank/delete", "kb", ["paris"]).status_code == 200
    assert post(client, "/memory_bank/get", "kb", ["paris"]).status_code == 404
    assert index.chunk_ids(collection, "paris") == []
    assert {c["document_uuid"] for c in chunks(client, "kb", "Paris France", top_k=10)} == {"tokyo"}

    assert client.delete("/memory_banks/drop", params={"bank_uuid": "kb"}, headers=ALPHA)
    assert jsonl(client.get("/memory_banks/get", headers=ALPHA)) == []
    assert not index.has_collection(collection)
    assert query(client, "kb", "Tokyo").status_code == 404
    again = client.delete("/memory_banks/drop", params={"bank_uuid": "kb"}, headers=ALPHA)
    assert again.status_code == 404


# ------------------------------------------------------------------ settings


@SQLITE_ONLY
def test_configure_and_settings(client: TestClient, embedding_app: Any) -> None:
    body = {"bank_uuid": "small", "bank_name": "small", "chunk_tokens": 16, "overlap_tokens": 4}
    made = client.post("/memory_banks/configure", json=body, headers=ALPHA)
    assert made.status_code == 200, made.text
    expected = {
        "bank_uuid": "small",
        "bank_name": "small",
        "embedding_model": embedding_app.name,
        "chunk_tokens": 16,
        "overlap_tokens": 4,
        "dimension": 384,
    }
    assert made.json() == expected
    again = client.post("/memory_banks/configure", json=body, headers=ALPHA)
    assert again.status_code == 200 and again.json() == expected
    other = client.post("/memory_banks/configure", json=body | {"chunk_tokens": 32}, headers=ALPHA)
    assert other.status_code == 409, other.text
    read = client.get("/memory_banks/settings", params={"bank_uuid": "small"}, headers=ALPHA)
    assert read.json() == expected

    # Small windows with overlap: several chunks, each its text's span, overlapping.
    long_text = " ".join([PARIS, TOKYO, PYTHON])
    assert post(client, "/memory_bank/insert", "small", [doc("long", long_text)]).status_code
    found = sorted(chunks(client, "small", "capital", top_k=100), key=lambda c: c["start"])
    assert len(found) >= 3
    assert all(c["text"] == long_text[c["start"] : c["end"]] for c in found)
    assert found[0]["start"] == 0 and found[-1]["end"] == len(long_text)
    assert all(a["end"] > b["start"] for a, b in itertools.pairwise(found))

    # The spec's create on a configured bank keeps its settings.
    assert create(client, "small", [], name="small").status_code == 200
    assert (
        client.get("/memory_banks/settings", params={"bank_uuid": "small"}, headers=ALPHA).json()
        == expected
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"embedding_model": LLM}, "not an embedding model"),
        ({"embedding_model": "nobody-serves-this"}, "nobody-serves-this"),
        ({"chunk_tokens": 4096}, "chunk_tokens"),
        ({"chunk_tokens": 32, "overlap_tokens": 32}, "overlap_tokens"),
        ({"chunk_tokens": 8}, "chunk_tokens"),
    ],
)
@SQLITE_ONLY
def test_configure_refuses_settings_it_cannot_use(
    client: TestClient, change: dict[str, Any], says: str
) -> None:
    body = {"bank_uuid": "bad", "bank_name": "bad"} | change
    response = client.post("/memory_banks/configure", json=body, headers=ALPHA)
    assert response.status_code == 422, response.text
    assert says in response.text
    assert jsonl(client.get("/memory_banks/get", headers=ALPHA)) == []


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("document", "status"),
    [
        ({**doc("d", "hi"), "content": "not base64!"}, 422),
        (doc("d", "hi", mime="application/x-unknown"), 422),
        (doc("d", "%PDF-1.7 but not really", mime="application/pdf"), 422),
        (doc("bad id!", "hi"), 422),
    ],
)
@SQLITE_ONLY
def test_bad_documents_store_nothing(
    app_parts: tuple[TestClient, MilvusIndex, Database], document: dict[str, Any], status: int
) -> None:
    client, index, database = app_parts
    assert create(client, "kb", [doc("ok", PARIS)]).status_code == 200
    response = post(client, "/memory_bank/insert", "kb", [doc("fine", TOKYO), document])
    assert response.status_code == status, response.text
    assert post(client, "/memory_bank/get", "kb", ["fine"]).status_code == 404
    assert index.chunk_ids(collection_of(database, "kb"), "fine") == []
    # The spec's create with a bad document makes no bank at all.
    assert create(client, "kb2", [document]).status_code == status
    assert [b["uuid"] for b in jsonl(client.get("/memory_banks/get", headers=ALPHA))] == ["kb"]


@SQLITE_ONLY
def test_unknown_bank_is_404_for_every_operation(client: TestClient) -> None:
    for path, body in [
        ("/memory_bank/insert", [doc("d", "hi")]),
        ("/memory_bank/update", [doc("d", "hi")]),
        ("/memory_bank/delete", ["d"]),
        ("/memory_bank/get", ["d"]),
    ]:
        assert post(client, path, "ghost", body).status_code == 404, path
    assert query(client, "ghost", "hi").status_code == 404
    assert (
        client.get(
            "/memory_banks/settings", params={"bank_uuid": "ghost"}, headers=ALPHA
        ).status_code
        == 404
    )


# ------------------------------------------------------------------ failures and crashes


def test_a_failed_sql_write_leaves_nothing_in_milvus(
    app_parts: tuple[TestClient, MilvusIndex, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, index, database = app_parts
    assert create(client, "kb", [doc("paris", PARIS)]).status_code == 200
    collection = collection_of(database, "kb")

    def broken(*args: Any, **kwargs: Any) -> None:
        # The chunks are in Milvus by now: the write got that far.
        assert index.chunk_ids(collection, "tokyo") == ["tokyo:1:0"]
        raise RuntimeError("the database went away")

    monkeypatch.setattr(MemoryBankStore, "add_document", broken)
    assert post(client, "/memory_bank/insert", "kb", [doc("tokyo", TOKYO)]).status_code == 500
    assert index.chunk_ids(collection, "tokyo") == []

    monkeypatch.setattr(MemoryBankStore, "replace_document", broken)
    failed = post(client, "/memory_bank/update", "kb", [doc("paris", TOKYO)])
    assert failed.status_code == 500
    assert index.chunk_ids(collection, "paris") == ["paris:1:0"]
    monkeypatch.undo()
    assert post(client, "/memory_bank/get", "kb", ["tokyo"]).status_code == 404
    assert [c["chunk_id"] for c in chunks(client, "kb", "capital", top_k=10)] == ["paris:1:0"]


@SQLITE_ONLY
def test_a_failed_embedding_stores_nothing(
    app_parts: tuple[TestClient, MilvusIndex, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _index, _database = app_parts

    async def broken(handle: Any, texts: Any) -> list[list[float]]:
        raise RuntimeError("the replica died")

    monkeypatch.setattr(memory_service.model_calls, "embed", broken)
    assert create(client, "kb", [doc("paris", PARIS)]).status_code == 500
    monkeypatch.undo()
    assert jsonl(client.get("/memory_banks/get", headers=ALPHA)) == []


@SQLITE_ONLY
def test_what_a_crash_leaves_in_milvus_is_never_visible(
    app_parts: tuple[TestClient, MilvusIndex, Database],
) -> None:
    """A process that died between its Milvus write and its SQL commit left chunks of a
    version SQL never switched to (an update) or of a document SQL never had (an insert):
    searches skip them, and the next write of that document removes them."""
    client, index, database = app_parts
    assert create(client, "kb", [doc("paris", PARIS)]).status_code == 200
    collection = collection_of(database, "kb")
    embedding = [1.0] + [0.0] * 383

    def leftover(chunk_id: str, document: str, text: str) -> ChunkRecord:
        return ChunkRecord(chunk_id, document, text, 0, len(text), embedding, {})

    index.insert(
        collection,
        [
            leftover("paris:2:0", "paris", "Paris crashed update zebra"),
            leftover("paris:2:5", "paris", "Paris crashed update zebra tail"),
            leftover("ghost:1:0", "ghost", "ghost crashed insert zebra"),
        ],
    )
    assert chunks(client, "kb", "zebra", mode="keyword", top_k=10) == []
    assert [c["chunk_id"] for c in chunks(client, "kb", "Paris", top_k=10)] == ["paris:1:0"]

    assert post(client, "/memory_bank/update", "kb", [doc("paris", TOKYO)]).status_code == 200
    assert post(client, "/memory_bank/insert", "kb", [doc("ghost", PYTHON)]).status_code == 200
    assert index.chunk_ids(collection, "paris") == ["paris:2:0"]
    assert index.chunk_ids(collection, "ghost") == ["ghost:1:0"]
    found = chunks(client, "kb", "zebra capital lists", top_k=10)
    assert sorted(c["chunk_id"] for c in found) == ["ghost:1:0", "paris:2:0"]
    assert all("zebra" not in c["text"] for c in found)


class WatchedIndex:
    """The real index, with a hook after each write (to look in on an update under way)."""

    def __init__(self, index: MilvusIndex, after_write: Any) -> None:
        self._index = index
        self.after_write = after_write

    def __getattr__(self, name: str) -> Any:
        return getattr(self._index, name)

    def insert(self, name: str, chunks: Any) -> None:
        self._index.insert(name, chunks)
        self.after_write("insert")

    def delete_chunks(self, name: str, chunk_ids: Any) -> None:
        self._index.delete_chunks(name, chunk_ids)
        self.after_write("delete_chunks")


def test_a_search_during_an_update_always_finds_the_document(
    app_parts: tuple[TestClient, MilvusIndex, Database], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At each step of an update (new chunks in, row switched, old chunks out) another
    request's search finds exactly one version of the document, never none."""
    client, _index, _database = app_parts
    assert create(client, "kb", [doc("paris", PARIS)]).status_code == 200
    service = client.app.state.services.memory_banks  # type: ignore[attr-defined]
    seen: list[tuple[str, list[str]]] = []
    original = service._index

    def look(step: str) -> None:
        # From the update's worker thread: a second request, served meanwhile.
        result: list[list[str]] = []
        thread = threading.Thread(
            target=lambda: result.append(
                [c["chunk_id"] for c in chunks(client, "kb", "capital", top_k=10)]
            )
        )
        thread.start()
        thread.join(30)
        seen.append((step, result[0]))

    monkeypatch.setattr(service, "_index", WatchedIndex(original, look))
    assert post(client, "/memory_bank/update", "kb", [doc("paris", TOKYO)]).status_code == 200
    monkeypatch.setattr(service, "_index", original)
    assert seen, "the update wrote nothing"
    for step, ids in seen:
        assert len(ids) == 1, (step, ids)
    assert seen[0] == ("insert", ["paris:1:0"])  # new chunks in, row not switched yet
    assert seen[-1] == ("delete_chunks", ["paris:2:0"])
    assert [c["chunk_id"] for c in chunks(client, "kb", "capital")] == ["paris:2:0"]


# ------------------------------------------------------------------ tenants


@SQLITE_ONLY
def test_tenants_never_see_each_others_banks(client: TestClient) -> None:
    assert create(client, "kb", [doc("paris", PARIS)]).status_code == 200
    assert jsonl(client.get("/memory_banks/get", headers=BETA)) == []
    for response in [
        post(client, "/memory_bank/get", "kb", ["paris"], BETA),
        post(client, "/memory_bank/insert", "kb", [doc("x", "x")], BETA),
        post(client, "/memory_bank/update", "kb", [doc("paris", "x")], BETA),
        post(client, "/memory_bank/delete", "kb", ["paris"], BETA),
        query(client, "kb", "Paris", BETA),
        client.get("/memory_banks/settings", params={"bank_uuid": "kb"}, headers=BETA),
        client.delete("/memory_banks/drop", params={"bank_uuid": "kb"}, headers=BETA),
    ]:
        assert response.status_code == 404, response.text
    # Beta's own bank of the same uuid is its own.
    assert create(client, "kb", [doc("tokyo", TOKYO)], name="beta's", headers=BETA)
    assert [c["document_uuid"] for c in chunks(client, "kb", "capital", top_k=10)] == ["paris"]
    beta = query(client, "kb", "capital", BETA, top_k=10).json()["chunks"]
    assert [c["document_uuid"] for c in beta] == ["tokyo"]
    assert jsonl(post(client, "/memory_bank/get", "kb", ["paris"])) == [doc("paris", PARIS)]
