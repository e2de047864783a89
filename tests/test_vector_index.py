"""MilvusIndex against a real `milvus-lite server` (the session's `milvus_uri`)."""

from __future__ import annotations

import random
import uuid

import pytest

from corral.vector_index import ChunkRecord, MilvusIndex

DIM = 8


def collection_name() -> str:
    return f"corral_{uuid.uuid4().hex}"


def vector(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-1, 1) for _ in range(DIM)]


def chunk(document: str, index: int, text: str, *, seed: int, **metadata: object) -> ChunkRecord:
    return ChunkRecord(
        chunk_id=f"{document}:1:{index}",
        document_uuid=document,
        text=text,
        start=index * 100,
        end=index * 100 + len(text),
        embedding=vector(seed),
        metadata=dict(metadata),
    )


def test_insert_then_search_each_mode(vector_index: MilvusIndex) -> None:
    name = collection_name()
    vector_index.create_collection(name, dimension=DIM)
    chunks = [
        chunk("doc-a", 0, "llamas graze on the high plateau", seed=1, topic="animals"),
        chunk("doc-a", 1, "the quarterly revenue rose sharply", seed=2, topic="finance"),
        chunk("doc-b", 0, "a zebra crossing near the station", seed=3, topic="city"),
    ]
    vector_index.insert(name, chunks)
    dense = vector_index.search(name, text="", embedding=vector(2), top_k=1, mode="dense")
    assert [h.chunk_id for h in dense] == ["doc-a:1:1"]
    assert dense[0].score == pytest.approx(1.0, abs=1e-5)
    keyword = vector_index.search(name, text="zebra", embedding=vector(9), top_k=3, mode="keyword")
    assert [h.chunk_id for h in keyword] == ["doc-b:1:0"]
    assert keyword[0].score > 0
    hybrid = vector_index.search(name, text="zebra", embedding=vector(3), top_k=3)
    assert hybrid[0].chunk_id == "doc-b:1:0"
    hit = hybrid[0]
    assert (hit.document_uuid, hit.start, hit.end, hit.metadata) == (
        "doc-b",
        0,
        len("a zebra crossing near the station"),
        {"topic": "city"},
    )
