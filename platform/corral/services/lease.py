"""One API replica of several acts for all: the holder of a named lease in the store
(`leases` table, corral/store/leases.py). Each pass of a loop that must run once per
cluster (the reconciler and admission) first calls `hold()`: True renews or takes the
lease, False means another replica holds it and the pass is skipped. A replica that dies
stops renewing; once `ttl_s` has passed another takes over. Stopping cleanly releases it
so that the next replica takes it at once, and a process that finds the lease held by a
dead process on its own host (an API server killed and restarted) takes it at once too."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from corral.store.db import Database
from corral.store.leases import LeaseStore
from corral.store.tables import utcnow

log = logging.getLogger(__name__)

RECONCILER_LEASE = "reconciler"


def _host() -> str:
    return socket.gethostname()[:128].replace(":", "-")


def replica_id() -> str:
    """This process's name as a lease holder: host, pid and a random part (a pid is
    reused after a restart, and containers often share one)."""
    return f"{_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead_here(holder: str) -> bool:
    """Whether `holder` names a process on this host that no longer exists. Anything
    else (another host, a name not made by `replica_id`, a live or foreign pid) is
    taken as alive: then the lease passes only once it expires."""
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    if host != _host() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


class Lease:
    def __init__(
        self,
        database: Database,
        *,
        name: str = RECONCILER_LEASE,
        holder: str | None = None,
        ttl_s: float,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = database
        self.name = name
        self.holder = holder or replica_id()
        self._ttl = timedelta(seconds=ttl_s)
        self._clock = clock
        self._held = False

    @property
    def held(self) -> bool:
        """Whether the last `hold()` got the lease (it may have expired since)."""
        return self._held

    def hold(self) -> bool:
        """Take or renew the lease for `ttl_s` from now; False while another holds it, or
        when the store cannot be reached (acting without knowing would be acting twice)."""
        now = self._clock()
        try:
            with self._db.transaction() as session:
                store = LeaseStore(session)
                until = now + self._ttl
                held = store.take(self.name, holder=self.holder, now=now, until=until)
                previous = None if held else store.holder(self.name, now=now)
                if previous is not None and _dead_here(previous):
                    held = store.take_over(
                        self.name, holder=self.holder, previous=previous, until=until
                    )
        except Exception:
            log.exception("lease %s: the store could not be reached", self.name)
            held = False
        if held != self._held:
            log.info(
                "lease %s %s by %s", self.name, "taken" if held else "lost/not held", self.holder
            )
        self._held = held
        return held

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        try:
            with self._db.transaction() as session:
                LeaseStore(session).release(self.name, holder=self.holder, now=self._clock())
        except Exception:
            log.exception("lease %s could not be released; it expires by itself", self.name)
