"""Memory banks: named collections of documents that agents retrieve from."""

from __future__ import annotations

import base64
import binascii

from pydantic import Field, field_validator

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
