"""Dataset rows, scoped by tenant; the caller owns the transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from corral.store.tables import Dataset, utcnow


class DatasetStore:
    def __init__(self, session: Session) -> None:
        self._session = session

    def get(self, *, tenant: str, uuid: str) -> Dataset | None:
        return self._session.get(Dataset, (tenant, uuid))

    def add(
        self,
        *,
        tenant: str,
        uuid: str,
        columns: dict[str, Any],
        content_url: str,
        metadata: dict[str, Any],
        request_digest: str,
        row_count: int,
    ) -> Dataset:
        dataset = Dataset(
            tenant=tenant,
            uuid=uuid,
            columns=columns,
            content_url=content_url,
            metadata_=metadata,
            request_digest=request_digest,
            row_count=row_count,
            created_at=utcnow(),
        )
        self._session.add(dataset)
        self._session.flush()
        return dataset

    def delete(self, *, tenant: str, uuid: str) -> bool:
        result = self._session.execute(
            delete(Dataset).where(Dataset.tenant == tenant, Dataset.uuid == uuid)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def find(self, *, tenant: str) -> list[Dataset]:
        query = select(Dataset).where(Dataset.tenant == tenant).order_by(Dataset.created_at)
        return list(self._session.scalars(query))
