"""What memory banks hand to their callers (the query route and the agents' retrieval)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from corral.vector_index import MetadataFilter


class BankSettings(BaseModel):
    """How a bank's documents are chunked and embedded. The defaults come from
    `Settings.memory_*`; a bank keeps the values it was created with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embedding_model: str = Field(min_length=1, max_length=128)
    chunk_tokens: int = Field(ge=16, le=8192)
    overlap_tokens: int = Field(ge=0, le=4096)

    @model_validator(mode="after")
    def _overlap_below_size(self) -> BankSettings:
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


@dataclass(frozen=True)
class RetrievedChunk:
    """One chunk a query found, with what a client needs to cite it."""

    bank_uuid: str
    document_uuid: str
    chunk_id: str
    text: str
    start: int  # [start, end) character offsets in the document's decoded text
    end: int
    score: float
    metadata: dict[str, Any]


class Retriever(Protocol):
    """What the agents' `memory_retrieval` step needs of memory banks."""

    async def query(
        self,
        *,
        tenant: str,
        bank_uuid: str,
        query: str,
        top_k: int,
        metadata_filter: MetadataFilter | None = None,
    ) -> list[RetrievedChunk]:
        """The bank's best `top_k` chunks, best first; NotFound for a bank the tenant does
        not have."""
        ...
