"""Where memory bank chunks live: the `VectorIndex` protocol, and (below it, added by the
Milvus client) its pymilvus implementation.

A bank is one collection (its name chosen by Corral, never by a user): each chunk carries
its text (BM25 is computed by Milvus from it), its dense embedding, the uuid of its
document, its character offsets in the document's decoded text, and the document's
metadata. Searches fuse dense and BM25 keyword rankings by reciprocal rank."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# Metadata filters are data, never a Milvus expression a user writes: each key must equal
# its value (or be one of a list of values), all keys together (AND). Keys are plain
# identifiers; values JSON scalars. The client builds the expression with escaping.
FilterScalar = str | int | float | bool
MetadataFilter = dict[str, FilterScalar | list[FilterScalar]]
SearchMode = Literal["hybrid", "dense", "keyword"]
# Reciprocal-rank fusion constant (Cormack et al. use 60; so does Milvus's RRFRanker).
RRF_K = 60


@dataclass(frozen=True)
class ChunkRecord:
    chunk_id: str  # unique in its collection: f"{document_uuid}:{version}:{index}"
    document_uuid: str
    text: str
    start: int  # [start, end) character offsets in the document's decoded text
    end: int
    embedding: list[float]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChunkHit:
    chunk_id: str
    document_uuid: str
    text: str
    start: int
    end: int
    metadata: dict[str, Any]
    score: float  # higher is better; RRF score for hybrid search


class VectorIndex(Protocol):
    """One bank per collection. Every method is idempotent where that makes sense
    (creating an existing collection, dropping a missing one, deleting missing ids)."""

    def create_collection(self, name: str, *, dimension: int) -> None: ...

    def drop_collection(self, name: str) -> None: ...

    def has_collection(self, name: str) -> bool: ...

    def insert(self, name: str, chunks: Sequence[ChunkRecord]) -> None: ...

    def delete_chunks(self, name: str, chunk_ids: Sequence[str]) -> None: ...

    def delete_documents(self, name: str, document_uuids: Sequence[str]) -> None: ...

    def chunk_ids(self, name: str, document_uuid: str) -> list[str]:
        """Every chunk id stored for one document (to remove an old version's chunks)."""
        ...

    def search(
        self,
        name: str,
        *,
        text: str,
        embedding: Sequence[float],
        top_k: int,
        metadata_filter: MetadataFilter | None = None,
        mode: SearchMode = "hybrid",
    ) -> list[ChunkHit]:
        """The best `top_k` chunks, best first: dense cosine, BM25 over `text`, or both
        fused by reciprocal rank (`RRF_K`)."""
        ...
