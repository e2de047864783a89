"""Memory bank and document rows, scoped by tenant; the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from corral.memory.types import BankSettings
from corral.store.tables import MemoryBank, MemoryBankDocument, utcnow


class MemoryBankStore:
    def __init__(self, session: Session) -> None:
        self._session = session

    # ------------------------------------------------------------------ banks

    def get(self, *, tenant: str, uuid: str) -> MemoryBank | None:
        return self._session.get(MemoryBank, (tenant, uuid))

    def add(
        self,
        *,
        tenant: str,
        uuid: str,
        name: str,
        collection: str,
        settings: BankSettings,
        dimension: int,
    ) -> MemoryBank:
        bank = MemoryBank(
            tenant=tenant,
            uuid=uuid,
            name=name,
            collection=collection,
            created_at=utcnow(),
            embedding_model=settings.embedding_model,
            chunk_tokens=settings.chunk_tokens,
            overlap_tokens=settings.overlap_tokens,
            dimension=dimension,
        )
        self._session.add(bank)
        self._session.flush()
        return bank

    def set_dimension(self, *, tenant: str, uuid: str, dimension: int) -> None:
        self._session.execute(
            update(MemoryBank)
            .where(MemoryBank.tenant == tenant, MemoryBank.uuid == uuid)
            .values(dimension=dimension)
        )

    def find(self, *, tenant: str) -> list[MemoryBank]:
        query = (
            select(MemoryBank)
            .where(MemoryBank.tenant == tenant)
            .order_by(MemoryBank.created_at, MemoryBank.uuid)
        )
        return list(self._session.scalars(query))

    def delete(self, *, tenant: str, uuid: str) -> bool:
        """The bank and (by the foreign key's cascade, and explicitly: SQLite enforces
        foreign keys only when asked) its documents."""
        self._session.execute(
            delete(MemoryBankDocument).where(
                MemoryBankDocument.tenant == tenant, MemoryBankDocument.bank_uuid == uuid
            )
        )
        result = self._session.execute(
            delete(MemoryBank).where(MemoryBank.tenant == tenant, MemoryBank.uuid == uuid)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ documents

    def documents(
        self, *, tenant: str, bank_uuid: str, uuids: Sequence[str] | None = None
    ) -> dict[str, MemoryBankDocument]:
        """The bank's documents by uuid (only those of `uuids`, where given)."""
        query = select(MemoryBankDocument).where(
            MemoryBankDocument.tenant == tenant, MemoryBankDocument.bank_uuid == bank_uuid
        )
        if uuids is not None:
            query = query.where(MemoryBankDocument.uuid.in_(list(uuids)))
        return {row.uuid: row for row in self._session.scalars(query)}

    def current_versions(
        self, *, tenant: str, bank_uuid: str, uuids: Sequence[str]
    ) -> dict[str, int]:
        query = select(MemoryBankDocument.uuid, MemoryBankDocument.version).where(
            MemoryBankDocument.tenant == tenant,
            MemoryBankDocument.bank_uuid == bank_uuid,
            MemoryBankDocument.uuid.in_(list(uuids)),
        )
        return {uuid: version for uuid, version in self._session.execute(query)}

    def add_document(
        self,
        *,
        tenant: str,
        bank_uuid: str,
        uuid: str,
        mime_type: str,
        metadata: dict[str, Any],
        content: str,
        content_digest: str,
        chunk_count: int,
    ) -> MemoryBankDocument:
        now = utcnow()
        row = MemoryBankDocument(
            tenant=tenant,
            bank_uuid=bank_uuid,
            uuid=uuid,
            mime_type=mime_type,
            metadata_=metadata,
            content=content,
            content_digest=content_digest,
            version=1,
            chunk_count=chunk_count,
            created_at=now,
            updated_at=now,
        )
        self._session.add(row)
        self._session.flush()
        return row

    def replace_document(
        self,
        *,
        tenant: str,
        bank_uuid: str,
        uuid: str,
        from_version: int,
        mime_type: str,
        metadata: dict[str, Any],
        content: str,
        content_digest: str,
        chunk_count: int,
    ) -> bool:
        """Switch a document to its next version, if it is still at `from_version` (False
        when another update got there first, or the document is gone)."""
        result = self._session.execute(
            update(MemoryBankDocument)
            .where(
                MemoryBankDocument.tenant == tenant,
                MemoryBankDocument.bank_uuid == bank_uuid,
                MemoryBankDocument.uuid == uuid,
                MemoryBankDocument.version == from_version,
            )
            .values(
                mime_type=mime_type,
                metadata_=metadata,
                content=content,
                content_digest=content_digest,
                chunk_count=chunk_count,
                version=from_version + 1,
                updated_at=utcnow(),
            )
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def delete_documents(self, *, tenant: str, bank_uuid: str, uuids: Sequence[str]) -> int:
        result = self._session.execute(
            delete(MemoryBankDocument).where(
                MemoryBankDocument.tenant == tenant,
                MemoryBankDocument.bank_uuid == bank_uuid,
                MemoryBankDocument.uuid.in_(list(uuids)),
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
