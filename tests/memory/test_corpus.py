"""The benchmark's labelled corpus loads, every document decodes (HTML without its
scripts), and recall_at_k counts what it should."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from corral.memory.documents import decode_document
from corral.memory.evaluation import load_corpus, recall_at_k

DATA = Path(__file__).resolve().parents[2] / "bench" / "data"


def test_the_corpus_loads_and_every_document_decodes() -> None:
    corpus = load_corpus(DATA / "memory_corpus.jsonl", DATA / "memory_questions.jsonl")
    assert len(corpus.documents) >= 40 and len(corpus.questions) >= 40
    kinds = {doc.mime_type for doc in corpus.documents}
    assert kinds == {"text/plain", "text/markdown", "text/html"}
    assert {q.kind for q in corpus.questions} == {"paraphrase", "keyword"}
    for doc in corpus.documents:
        text = decode_document(doc.content, doc.mime_type, max_bytes=1 << 20)
        assert "<" not in text or doc.mime_type != "text/html", doc.metadata
        assert "analytics" not in text and "_paq" not in text and "popup" not in text
        spec = doc.spec_document()
        assert base64.b64decode(spec["content"]) == doc.content
        assert set(spec) == {"uuid", "content", "metadata", "mime_type"}


def test_load_corpus_refuses_questions_about_unknown_documents(tmp_path: Path) -> None:
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        json.dumps({"uuid": "a", "mime_type": "text/plain", "metadata": {}, "text": "x"})
    )
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "?", "document_uuid": "b", "kind": "keyword"}))
    with pytest.raises(ValueError, match="unknown documents"):
        load_corpus(docs, questions)


def test_recall_at_k_counts_distinct_documents() -> None:
    rankings = [["a", "a", "a", "b"], ["c", "b"], ["x", "y", "z", "b"]]
    assert recall_at_k(rankings, ["b", "b", "b"], k=2) == pytest.approx(2 / 3)
    assert recall_at_k(rankings, ["b", "b", "b"], k=3) == pytest.approx(2 / 3)
    assert recall_at_k(rankings, ["b", "b", "b"], k=4) == 1.0
