"""Readiness: whether this API process can do its work now. Each backend it was built
with is checked (the SQL store always; Ray where the app has a Ray connection; the Ray
Jobs API where it submits jobs; Milvus where memory banks are configured), each within a
timeout, all at once.

What a check failed with is logged here, once per change of state, and never answered:
a probe's caller learns which check failed and a generic reason (`unavailable`, `timed
out`), not a host, URL, path or error text. A check still running from an earlier probe
(a backend that hangs) is waited on again rather than started twice, so a hung backend
holds one thread per check, not one per probe."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass

from corral.ray_jobs import JobLauncher
from corral.store.db import Database
from corral.vector_index import VectorIndex

log = logging.getLogger(__name__)

Check = Callable[[], object]  # returns when the backend answered; raises when not
# A name no job ever has (job keys start with a tenant slug and `_`, see corral.tenancy)
# and no collection Corral makes (`corral_<hex>`): asking about it is a round trip only.
PROBE_JOB_ID = "corral-readiness-probe"
PROBE_COLLECTION = "corral_readiness_probe"


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str | None = None  # generic: "unavailable", "timed out"


class _Probe:
    def __init__(self, name: str, check: Check) -> None:
        self.name = name
        self._check = check
        self._lock = threading.Lock()
        self._running: Future[object] | None = None
        self._last_ok: bool | None = None

    def _start(self) -> Future[object]:
        with self._lock:
            if self._running is None or self._running.done():
                future: Future[object] = Future()

                def run() -> None:
                    try:
                        future.set_result(self._check())
                    except BaseException as exc:
                        future.set_exception(exc)

                # A daemon thread: a check that never returns must not hold up exit.
                threading.Thread(target=run, name=f"ready-{self.name}", daemon=True).start()
                self._running = future
            return self._running

    async def run(self, timeout_s: float) -> CheckResult:
        answer = asyncio.wrap_future(self._start())
        done, _ = await asyncio.wait({answer}, timeout=timeout_s)
        if not done:  # it goes on in its thread; the next probe waits on it again
            answer.add_done_callback(_retrieve)
            result = CheckResult(ok=False, reason="timed out")
            self._note(result, f"no answer within {timeout_s} s")
        elif (exc := answer.exception()) is not None:
            result = CheckResult(ok=False, reason="unavailable")
            self._note(result, f"{type(exc).__name__}: {exc}")
        else:
            result = CheckResult(ok=True)
            self._note(result, "")
        return result

    def _note(self, result: CheckResult, detail: str) -> None:
        if result.ok != self._last_ok:
            if result.ok:
                log.info("readiness: %s is available", self.name)
            else:
                log.warning("readiness: %s is not available: %s", self.name, detail[:500])
        self._last_ok = result.ok


def _retrieve(answer: asyncio.Future[object]) -> None:
    """Mark a late answer's error as seen (asyncio logs unseen ones)."""
    if not answer.cancelled():
        answer.exception()


class Readiness:
    """The named checks, run together, each within `timeout_s`."""

    def __init__(self, checks: Mapping[str, Check], *, timeout_s: float) -> None:
        self._probes = [_Probe(name, check) for name, check in checks.items()]
        self.timeout_s = timeout_s

    @property
    def names(self) -> list[str]:
        return [probe.name for probe in self._probes]

    async def check(self) -> dict[str, CheckResult]:
        results = await asyncio.gather(*(p.run(self.timeout_s) for p in self._probes))
        return {probe.name: result for probe, result in zip(self._probes, results, strict=True)}


def _ray_cluster() -> object:
    import ray

    if not ray.is_initialized():
        raise RuntimeError("this process is not connected to Ray")
    return ray.cluster_resources()  # type: ignore[no-untyped-call]  # a GCS round trip


def build_readiness(
    *,
    database: Database,
    timeout_s: float,
    has_ray: bool = False,
    cluster_resources: Callable[[], object] | None = None,
    launcher: JobLauncher | None = None,
    vector_index: VectorIndex | None = None,
) -> Readiness:
    """The checks of an app built with these collaborators: `database` always, `ray`
    where the app has a Ray connection (`has_ray`: a models service, or
    `cluster_resources`, which is then the call made), `ray_jobs` where it has a
    launcher, `milvus` where it has a vector index."""
    checks: dict[str, Check] = {"database": database.ping}
    if has_ray or cluster_resources is not None:
        checks["ray"] = cluster_resources if cluster_resources is not None else _ray_cluster
    if launcher is not None:
        checks["ray_jobs"] = lambda: launcher.info(PROBE_JOB_ID)
    if vector_index is not None:
        checks["milvus"] = lambda: vector_index.has_collection(PROBE_COLLECTION)
    return Readiness(checks, timeout_s=timeout_s)
