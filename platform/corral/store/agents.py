"""Agents in the SQL store (`agents`): the create request as given, scoped by tenant;
the caller owns the transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session

from corral.store.tables import Agent, utcnow


class AgentStore:
    def __init__(self, session: Session) -> None:
        self._session = session

    def get(self, *, tenant: str, uuid: str) -> Agent | None:
        return self._session.get(Agent, (tenant, uuid))

    def add(self, *, tenant: str, uuid: str, config: dict[str, Any], request_digest: str) -> None:
        """A row under the same (tenant, uuid) makes the flush raise IntegrityError."""
        self._session.add(
            Agent(
                tenant=tenant,
                uuid=uuid,
                config=config,
                request_digest=request_digest,
                created_at=utcnow(),
            )
        )
        self._session.flush()

    def delete(self, *, tenant: str, uuid: str) -> bool:
        result = self._session.execute(
            delete(Agent).where(Agent.tenant == tenant, Agent.uuid == uuid)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]
