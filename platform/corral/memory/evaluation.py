"""A labelled retrieval corpus (documents, and questions each answered by one known
document) in JSONL, and recall@k over it. The benchmark (`bench/memory.py`) and the
recall tests read the same files, `bench/data/memory_corpus.jsonl` and
`bench/data/memory_questions.jsonl`; this loader lives in the package because a bench
script run from a clean checkout cannot import `tests/`.

A document row: `{"uuid", "mime_type", "metadata", "text"}`, the text as the bytes of
the document would decode (HTML rows are markup); `spec_document()` is the spec's
`MemoryBankDocument` for it (content base64). A question row: `{"question",
"document_uuid", "kind"}`, kind `paraphrase` (other words than the document's: dense
retrieval helps) or `keyword` (a rare term or code: BM25 helps)."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class CorpusDocument:
    uuid: str
    mime_type: str
    metadata: dict[str, Any]
    text: str

    @property
    def content(self) -> bytes:
        return self.text.encode("utf-8")

    def spec_document(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "content": base64.b64encode(self.content).decode("ascii"),
            "metadata": self.metadata,
            "mime_type": self.mime_type,
        }


@dataclass(frozen=True)
class CorpusQuestion:
    question: str
    document_uuid: str
    kind: Literal["paraphrase", "keyword"]


@dataclass(frozen=True)
class LabelledCorpus:
    documents: list[CorpusDocument]
    questions: list[CorpusQuestion]


def load_corpus(documents: Path, questions: Path) -> LabelledCorpus:
    """Both files, checked: unique document uuids, every question's document present."""
    docs = [CorpusDocument(**row) for row in _rows(documents)]
    asked = [CorpusQuestion(**row) for row in _rows(questions)]
    uuids = {doc.uuid for doc in docs}
    if len(uuids) != len(docs):
        raise ValueError(f"{documents}: document uuids are not unique")
    missing = {q.document_uuid for q in asked} - uuids
    if missing:
        raise ValueError(f"{questions}: questions name unknown documents {sorted(missing)}")
    return LabelledCorpus(documents=docs, questions=asked)


def recall_at_k(
    ranked_documents: Sequence[Sequence[str]], expected: Sequence[str], *, k: int
) -> float:
    """The share of questions whose answering document is among the first `k` distinct
    documents of its ranking (chunk hits give document uuids, repeats allowed)."""
    if len(ranked_documents) != len(expected):
        raise ValueError("one ranking per question")
    if not expected:
        raise ValueError("no questions")
    found = 0
    for ranking, answer in zip(ranked_documents, expected, strict=True):
        found += answer in list(dict.fromkeys(ranking))[:k]
    return found / len(expected)


def _rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]
