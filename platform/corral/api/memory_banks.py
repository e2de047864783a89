"""Memory banks: named collections of documents that agents retrieve from."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, field_validator

from corral.api.common import Id, JsonObject, SpecModel


class MemoryBank(SpecModel):
    uuid: str
    name: str


class MemoryBankDocument(SpecModel):
    uuid: Id
    content: str = Field(
        json_schema_extra={"contentEncoding": "base64"},
        description="The document's bytes, base64-encoded (checked to decode).",
    )
    metadata: JsonObject
    mime_type: str

    @field_validator("content")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"content is not valid base64: {exc}") from None
        return value


# ---------------------------------------------------------------- Corral's own routes
# (tag "Corral": the spec's create takes only a uuid, a name and documents, so a bank's
# chunking and embedding settings, and retrieval itself, have routes of their own.)

# A metadata key a filter may name: a plain identifier (the Milvus client escapes values,
# never keys, so keys are held to this alphabet).
FilterKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
FilterText = Annotated[str, StringConstraints(max_length=1024)]
FilterScalar = FilterText | bool | int | float
FilterValue = FilterScalar | Annotated[list[FilterScalar], Field(min_length=1, max_length=100)]


class ConfigureMemoryBankRequest(SpecModel):
    """An empty bank with these settings (the server's `memory_*` defaults for what is
    left out). The same request again is a no-op; other settings for a bank that exists,
    409."""

    bank_uuid: Id
    bank_name: Id
    embedding_model: Id | None = Field(
        default=None, description="A served embedding model the tenant can use."
    )
    chunk_tokens: int | None = Field(
        default=None, ge=16, le=8192, description="At most the embedding model's max_tokens."
    )
    overlap_tokens: int | None = Field(
        default=None, ge=0, le=4096, description="Smaller than chunk_tokens."
    )


class MemoryBankSettings(SpecModel):
    bank_uuid: str
    bank_name: str
    embedding_model: str
    chunk_tokens: int
    overlap_tokens: int
    dimension: int = Field(description="The length of the bank's embedding vectors.")


class MemoryBankQueryRequest(SpecModel):
    bank_uuid: Id
    query: str = Field(min_length=1, max_length=8192)
    top_k: int = Field(default=5, ge=1, le=100)
    metadata_filter: dict[FilterKey, FilterValue] | None = Field(
        default=None,
        max_length=16,
        description="Each key's metadata value must equal the value given, or be one of "
        "the list's values; all keys must match.",
    )
    mode: Literal["hybrid", "dense", "keyword"] = Field(
        default="hybrid",
        description="hybrid: dense and BM25 keyword rankings fused by reciprocal rank.",
    )


class RetrievedChunkModel(SpecModel):
    document_uuid: str
    chunk_id: str
    text: str
    start: int = Field(description="Character offset in the document's decoded text.")
    end: int = Field(description="End (exclusive) of the chunk in the decoded text.")
    score: float
    metadata: JsonObject


class MemoryBankQueryResponse(SpecModel):
    chunks: list[RetrievedChunkModel]
