"""Named leases in the store: one conditional UPDATE (or INSERT for a lease never taken)
takes or renews one, so among several API replicas on one database exactly one holds it
at a time. Times are the callers' clocks (UTC); replicas' clocks must agree to well
within a lease's length (NTP), which is what a lease of tens of seconds allows."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from corral.store.tables import Lease


class LeaseStore:
    def __init__(self, session: Session) -> None:
        self._session = session

    def take(self, name: str, *, holder: str, now: datetime, until: datetime) -> bool:
        """Hold `name` until `until`: renewed if `holder` has it, taken if nobody has it
        or its holder let it expire. False (and nothing changed) while another holds it."""
        result = self._session.execute(
            update(Lease)
            .where(Lease.name == name, or_(Lease.holder == holder, Lease.expires_at <= now))
            .values(holder=holder, expires_at=until)
            .execution_options(synchronize_session=False)
        )
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return True
        if self._session.get(Lease, name) is not None:
            return False  # held by another, unexpired
        try:
            with self._session.begin_nested():
                self._session.add(Lease(name=name, holder=holder, expires_at=until))
        except IntegrityError:
            return False  # another replica took it first
        return True

    def take_over(self, name: str, *, holder: str, previous: str, until: datetime) -> bool:
        """Take `name` from `previous`, known to be dead, if it still holds it."""
        result = self._session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == previous)
            .values(holder=holder, expires_at=until)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def release(self, name: str, *, holder: str, now: datetime) -> None:
        """Give the lease up now (if `holder` has it), so another replica takes it at once."""
        self._session.execute(
            update(Lease)
            .where(Lease.name == name, Lease.holder == holder)
            .values(expires_at=now)
            .execution_options(synchronize_session=False)
        )

    def holder(self, name: str, *, now: datetime) -> str | None:
        """Who holds `name` now (None: nobody, or it expired)."""
        lease = self._session.scalars(
            select(Lease).where(Lease.name == name).execution_options(populate_existing=True)
        ).one_or_none()
        if lease is None or lease.expires_at <= now:
            return None
        return lease.holder
