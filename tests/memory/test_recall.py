"""recall@3 on the labelled corpus at the VectorIndex level: the corpus decoded, chunked
in token windows by the real MiniLM tokenizer, embedded in process by the real
sentence-transformers engine, stored in a real Milvus Lite server through MilvusIndex,
and every question searched dense, keyword (Milvus's BM25) and hybrid (RRF).

Chunks are 96 tokens with 24 overlapping, so most documents are two or three chunks and
the answer has to be found in the right one (at the default 192 tokens each document of
this corpus is a single chunk)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.memory.chunking import chunk_windows
from corral.memory.documents import decode_document
from corral.memory.evaluation import LabelledCorpus, load_corpus, recall_at_k
from corral.vector_index import ChunkRecord, SearchMode

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"
CHUNK_TOKENS, OVERLAP_TOKENS = 96, 24
COLLECTION = "corral_recall_test"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def corpus() -> LabelledCorpus:
    return load_corpus(DATA / "memory_corpus.jsonl", DATA / "memory_questions.jsonl")


@pytest.fixture(scope="module")
def engine(embedding_model_dir: Path) -> Any:
    from serve_apps.engines.sentence_transformers_embedding import (
        SentenceTransformersEmbeddingEngine,
        SentenceTransformersEngineConfig,
    )

    return SentenceTransformersEmbeddingEngine(
        SentenceTransformersEngineConfig(model_dir=embedding_model_dir, device="cpu")
    )


@pytest.fixture(scope="module")
def records(corpus: LabelledCorpus, engine: Any) -> list[ChunkRecord]:
    records = []
    for doc in corpus.documents:
        text = decode_document(doc.content, doc.mime_type, max_bytes=1 << 20)
        windows = chunk_windows(engine.token_spans(text), size=CHUNK_TOKENS, overlap=OVERLAP_TOKENS)
        vectors = engine.embed([text[s:e] for s, e in windows])
        records += [
            ChunkRecord(
                chunk_id=f"{doc.uuid}:1:{i}",
                document_uuid=doc.uuid,
                text=text[s:e],
                start=s,
                end=e,
                embedding=vector,
                metadata=doc.metadata,
            )
            for i, ((s, e), vector) in enumerate(zip(windows, vectors, strict=True))
        ]
    return records


@pytest.fixture(scope="module")
def bank(records: list[ChunkRecord], engine: Any, milvus_uri: str) -> Iterator[Any]:
    from corral.vector_index import MilvusIndex

    index = MilvusIndex(milvus_uri)
    index.create_collection(COLLECTION, dimension=engine.info.dimension)
    index.insert(COLLECTION, records)
    try:
        yield index
    finally:
        index.drop_collection(COLLECTION)
        index.close()


def recall(bank: Any, engine: Any, corpus: LabelledCorpus, mode: SearchMode) -> dict[str, float]:
    vectors = engine.embed([q.question for q in corpus.questions])
    rankings = [
        [
            hit.document_uuid
            for hit in bank.search(
                COLLECTION, text=q.question, embedding=vector, top_k=3, mode=mode
            )
        ]
        for q, vector in zip(corpus.questions, vectors, strict=True)
    ]
    figures = {"all": recall_at_k(rankings, [q.document_uuid for q in corpus.questions], k=3)}
    for kind in ("paraphrase", "keyword"):
        picked = [i for i, q in enumerate(corpus.questions) if q.kind == kind]
        figures[kind] = recall_at_k(
            [rankings[i] for i in picked], [corpus.questions[i].document_uuid for i in picked], k=3
        )
    print(f"recall@3 {mode}: {figures}")
    return figures


def test_the_corpus_is_chunked_into_several_windows_per_document(
    bank: Any, corpus: LabelledCorpus
) -> None:
    ids = {doc.uuid: len(bank.chunk_ids(COLLECTION, doc.uuid)) for doc in corpus.documents}
    assert all(count >= 1 for count in ids.values())
    assert sum(ids.values()) >= 2 * len(corpus.documents)


def test_recall_at_3_dense_keyword_hybrid(bank: Any, engine: Any, corpus: LabelledCorpus) -> None:
    dense = recall(bank, engine, corpus, "dense")
    keyword = recall(bank, engine, corpus, "keyword")
    hybrid = recall(bank, engine, corpus, "hybrid")
    assert hybrid["all"] >= 0.9
    assert dense["all"] >= 0.9 and dense["paraphrase"] >= 0.9
    # BM25 finds rare terms and codes; on paraphrases (other words) it is weaker by design
    assert keyword["keyword"] >= 0.9
    assert keyword["paraphrase"] < dense["paraphrase"]
