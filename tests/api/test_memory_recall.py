"""recall@3 through the HTTP API: the labelled corpus (bench/data) put into a bank with
`/memory_banks/configure` (96-token chunks, 24 overlapping) and `/memory_bank/insert`,
every question asked through `POST /memory_bank/query` (hybrid, top_k 3), on a real
Milvus Lite server and the real all-MiniLM-L6-v2 embedding app on Serve (SQLite only: recall
is not about the SQL backend)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from corral.app import create_app
from corral.config import Settings
from corral.memory.evaluation import LabelledCorpus, load_corpus, recall_at_k
from corral.services.models import build_model_service
from corral.serving.catalog import model_roots
from corral.serving.deployer import ServeDeployer
from corral.store.db import Database
from corral.vector_index import MilvusIndex
from tests.api.conftest import ALPHA, API_KEYS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"
BANK = "recall-bank"


@pytest.fixture
def client(
    embedding_app: Any, vector_index: MilvusIndex, sqlite_database: Database, tmp_path: Path
) -> Iterator[TestClient]:
    settings = Settings(
        home=tmp_path / "home", api_keys=API_KEYS, memory_embedding_model=embedding_app.name
    )
    registry = build_model_service(
        database=sqlite_database,
        deployer=ServeDeployer(),
        file_models=[embedding_app.spec],
        model_roots=model_roots(settings),
    )
    app = create_app(settings, database=sqlite_database, models=registry, vector_index=vector_index)
    with TestClient(app) as client:
        yield client


def test_recall_at_3_through_the_query_route(client: TestClient) -> None:
    corpus: LabelledCorpus = load_corpus(
        DATA / "memory_corpus.jsonl", DATA / "memory_questions.jsonl"
    )
    configure = {"bank_uuid": BANK, "bank_name": "corpus", "chunk_tokens": 96,
                 "overlap_tokens": 24}  # fmt: skip
    response = client.post("/memory_banks/configure", json=configure, headers=ALPHA)
    assert response.status_code == 200, response.text
    docs = [doc.spec_document() for doc in corpus.documents]
    for offset in range(0, len(docs), 16):
        response = client.post(
            "/memory_bank/insert",
            params={"bank_uuid": BANK},
            json=docs[offset : offset + 16],
            headers=ALPHA,
        )
        assert response.status_code == 200, response.text
    rankings = []
    for question in corpus.questions:
        body = {"bank_uuid": BANK, "query": question.question, "top_k": 3}
        response = client.post("/memory_bank/query", json=body, headers=ALPHA)
        assert response.status_code == 200, response.text
        chunks = response.json()["chunks"]
        assert len(chunks) == 3
        for chunk in chunks:  # what a client cites: the offsets hold the chunk's text
            assert 0 <= chunk["start"] < chunk["end"] and chunk["text"]
        rankings.append([chunk["document_uuid"] for chunk in chunks])
    recall = recall_at_k(rankings, [q.document_uuid for q in corpus.questions], k=3)
    print(f"recall@3 through /memory_bank/query (hybrid): {recall:.3f}")
    assert recall >= 0.9
