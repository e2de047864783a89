"""Admission: which stored jobs are handed to Ray, and when. Ray has no job queue (a job
it cannot place just waits inside Ray, invisibly, in no order), so Corral keeps one: a
small policy over Ray's resource counts, not a scheduler of tasks. docs/admission.md is
the operator's account of it; in short:

- **Need.** A job holds `need` while it runs (jobs/resources.py: workers x one GPU or CPU
  each, from config; a synthetic data job's stage actors), stored on its row.
- **Refusal.** A job that needs more of a resource than the cluster can ever have (Ray's
  total now, or the configured autoscaler maximum if larger) is refused at submission
  (`JobTooLarge`, 422), and one that needs more GPUs than its tenant may hold at once
  (`QuotaExceeded`, 403); nothing is stored. A job is never shrunk to fit.
- **Free.** `free = min(available - pending, total - committed) + headroom`, per resource:
  Ray's available resources less the need of jobs admitted but still `scheduled` (handed
  to Ray, workers not placed yet); never more than the total less everything admitted and
  unfinished (a job marks itself running before its workers are placed); plus what an
  autoscaler may still add (`cluster_max - total`), so that a job that needs a scale-up is
  admitted and its pending placement makes the autoscaler act.
- **Order.** Queued jobs (scheduled, not admitted) are ranked by `r = jobs the tenant has
  admitted and unfinished + the job's place in its tenant's queue`, then by submission
  time: first come within a tenant, round-robin across tenants, and a tenant running many
  jobs yields to one running few.
- **Strict, with safe backfill.** The pass walks that order once. A job that fits is
  admitted; one that does not waits and *reserves* what it needs out of what is free, so
  a job behind it starts only with resources no earlier waiting job needs (a CPU job may
  pass a GPU job waiting for GPUs; a small GPU job never takes the GPUs a big one at the
  head waits for, so the big one is not starved). Within a tenant nothing passes an
  earlier job. A job needing more than the cluster has now (it shrank) waits without
  reserving, so it cannot block everything.
- **Tenant limits.** `tenant_max_running_jobs`, `tenant_max_job_gpus` (0: unlimited): a
  tenant at its limit is skipped (its jobs wait, reserving nothing), never blocking others.
- Each waiting job's place (1: next) and reason ("waiting for 2 GPU; 1 free") are written
  to its row for the job views; its log says when it queued and when it was admitted.

A pass runs after each submission and after each reconciler pass, only on the replica
that holds the reconciler's lease (services/lease.py). Within a process passes are
serialized. Admitting is a conditional UPDATE before the Ray submission, so a job is
admitted once and a cancelled job never is; the reconciler submits an admitted job whose
submission was lost, and never a queued one.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from corral.config import Settings
from corral.errors import BackendUnavailable, JobTooLarge, QuotaExceeded
from corral.ray_jobs import JobLauncher
from corral.services.lease import Lease
from corral.store.admission import AdmissionStore, JobNeed
from corral.store.db import Database
from corral.store.jobs import JobStatus, JobStore

log = logging.getLogger(__name__)

# Ray's resource counts (`ray.cluster_resources`, `ray.available_resources`).
ClusterResources = Callable[[], Mapping[str, float]]
# Ray reports fractions of a resource rounded; a need within this of what is free fits.
EPSILON = 1e-6
GPU, CPU = "GPU", "CPU"


@dataclass(frozen=True)
class AdmissionLimits:
    """The operator's bounds. `cluster_max`: the most of a resource the cluster can have
    (an autoscaler's maximum; absent: Ray's total now). The tenant limits count jobs
    admitted and unfinished; 0 means unlimited."""

    cluster_max: Mapping[str, float] = field(default_factory=dict)
    tenant_max_running_jobs: int = 0
    tenant_max_job_gpus: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> AdmissionLimits:
        maxima = {CPU: settings.cluster_max_cpus, GPU: settings.cluster_max_gpus}
        return cls(
            cluster_max={name: value for name, value in maxima.items() if value > 0},
            tenant_max_running_jobs=settings.tenant_max_running_jobs,
            tenant_max_job_gpus=settings.tenant_max_job_gpus,
        )


@dataclass(frozen=True)
class Waiting:
    key: str
    position: int
    reason: str


@dataclass(frozen=True)
class Plan:
    """One pass's decisions: the keys to admit, in order, and the jobs that wait."""

    admit: list[str]
    waiting: list[Waiting]


def amount(value: float) -> str:
    """`2.0` -> "2", `0.15` -> "0.15"."""
    return f"{round(value, 3):g}"


def describe(need: Mapping[str, float]) -> str:
    return ", ".join(f"{amount(v)} {k}" for k, v in sorted(need.items()) if v > 0) or "nothing"


def _sum(needs: Iterable[Mapping[str, float]]) -> dict[str, float]:
    total: dict[str, float] = defaultdict(float)
    for need in needs:
        for name, value in need.items():
            total[name] += value
    return total


def free_resources(
    *,
    available: Mapping[str, float],
    totals: Mapping[str, float],
    committed: list[JobNeed],
    cluster_max: Mapping[str, float],
) -> dict[str, float]:
    """What admission may still hand out, per resource (see the module docstring)."""
    pending = _sum(job.need for job in committed if job.status is JobStatus.SCHEDULED)
    held = _sum(job.need for job in committed)
    names = set(available) | set(totals) | set(held) | set(cluster_max)
    free = {}
    for name in names:
        total = totals.get(name, 0.0)
        now = min(available.get(name, 0.0) - pending[name], total - held[name])
        free[name] = max(0.0, now) + max(0.0, cluster_max.get(name, 0.0) - total)
    return free


def capacity(totals: Mapping[str, float], cluster_max: Mapping[str, float]) -> dict[str, float]:
    """The most of each resource the cluster can ever have."""
    names = set(totals) | set(cluster_max)
    return {n: max(totals.get(n, 0.0), cluster_max.get(n, 0.0)) for n in names}


def _short(need: Mapping[str, float], free: Mapping[str, float]) -> str | None:
    """The first resource (by name) of which `need` asks more than `free` has."""
    for name in sorted(need):
        if need[name] > free.get(name, 0.0) + EPSILON:
            return name
    return None


def plan(
    queue: list[JobNeed],
    committed: list[JobNeed],
    *,
    free: Mapping[str, float],
    capacity: Mapping[str, float],
    limits: AdmissionLimits,
) -> Plan:
    """The pass's decisions over `queue` (first come first), given what `committed` jobs
    hold and what is `free`: the order, reservation and limits of the module docstring.
    Pure: the tests drive it with plain values."""
    running: dict[str, int] = defaultdict(int)
    gpus: dict[str, float] = defaultdict(float)
    for job in committed:
        running[job.tenant] += 1
        gpus[job.tenant] += job.need.get(GPU, 0.0)
    place: dict[str, int] = defaultdict(int)
    ranked: list[tuple[int, JobNeed]] = []
    for job in queue:  # first come first: a tenant's n-th job has place n
        ranked.append((running[job.tenant] + place[job.tenant], job))
        place[job.tenant] += 1
    ranked.sort(key=lambda pair: (pair[0], pair[1].scheduled_at, pair[1].key))

    remaining = dict(free)
    reserved: dict[str, float] = defaultdict(float)
    held_back: dict[str, str] = {}  # tenant -> uuid of its first job that waits
    admit: list[str] = []
    reasons: list[tuple[str, str]] = []
    for _, job in ranked:
        tenant, need = job.tenant, job.need
        reason: str | None = None
        reserve = False
        if tenant in held_back:
            reason = f"behind this tenant's earlier job {held_back[tenant]!r}"
        elif limits.tenant_max_running_jobs and running[tenant] >= limits.tenant_max_running_jobs:
            limit = limits.tenant_max_running_jobs
            reason = (
                f"at the tenant's limit of {limit} unfinished job{'s' if limit != 1 else ''}; "
                "waiting for one to end"
            )
        elif (
            limits.tenant_max_job_gpus
            and gpus[tenant] + need.get(GPU, 0.0) > limits.tenant_max_job_gpus + EPSILON
        ):
            reason = (
                f"waiting for {amount(need[GPU])} GPU within the tenant's limit of "
                f"{amount(limits.tenant_max_job_gpus)}; its jobs hold {amount(gpus[tenant])}"
            )
        elif (short := _short(need, remaining)) is None:
            admit.append(job.key)
            for name, value in need.items():
                remaining[name] = remaining.get(name, 0.0) - value
            running[tenant] += 1
            gpus[tenant] += need.get(GPU, 0.0)
            continue
        elif need[short] > capacity.get(short, 0.0) + EPSILON:
            reason = (
                f"needs {amount(need[short])} {short}; the cluster has "
                f"{amount(capacity.get(short, 0.0))} in all now"
            )
        else:
            free_now = max(0.0, remaining.get(short, 0.0))
            reason = f"waiting for {amount(need[short])} {short}; {amount(free_now)} free"
            if reserved[short] > EPSILON:
                reason += f" after {amount(reserved[short])} kept for jobs ahead of it"
            reserve = True
        if reserve:  # later jobs may only use what this one does not need
            for name, value in need.items():
                taken = min(value, max(0.0, remaining.get(name, 0.0)))
                remaining[name] = remaining.get(name, 0.0) - taken
                reserved[name] += taken
        held_back[tenant] = job.uuid
        reasons.append((job.key, reason))
    waiting = [Waiting(key, index, reason) for index, (key, reason) in enumerate(reasons, 1)]
    return Plan(admit=admit, waiting=waiting)


@dataclass(frozen=True)
class AdmissionPass:
    """What one pass did: the keys admitted (and handed to Ray, or left for the reconciler
    to hand over when Ray could not take them) and the jobs that wait."""

    admitted: list[str]
    waiting: list[Waiting]


class Admitter:
    def __init__(
        self,
        *,
        database: Database,
        launcher: JobLauncher,
        totals: ClusterResources,
        available: ClusterResources,
        limits: AdmissionLimits | None = None,
        lease: Lease | None = None,
    ) -> None:
        """`totals` and `available` are Ray's counts (`ray.cluster_resources`,
        `ray.available_resources`). With `lease`, `admit_if_leader` runs a pass only
        while this replica holds it (the periodic reconciler holds it)."""
        self._db = database
        self._launcher = launcher
        self._totals = totals
        self._available = available
        self.limits = limits or AdmissionLimits()
        self._lease = lease
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ at submission

    def check(self, *, need: Mapping[str, float]) -> None:
        """Refuse a job the cluster can never run (JobTooLarge) or that needs more GPUs
        than its tenant may hold (QuotaExceeded). BackendUnavailable when Ray's totals
        cannot be read and no maximum is configured for what the job needs."""
        gpus = need.get(GPU, 0.0)
        cap_gpus = self.limits.tenant_max_job_gpus
        if cap_gpus and gpus > cap_gpus + EPSILON:
            raise QuotaExceeded(
                f"the job needs {amount(gpus)} GPU; a tenant's jobs may hold at most "
                f"{amount(cap_gpus)} at once (CORRAL_TENANT_MAX_JOB_GPUS)"
            )
        wanted = {name: value for name, value in need.items() if value > 0}
        if all(name in self.limits.cluster_max for name in wanted):
            totals: Mapping[str, float] = {}  # the configured maxima decide alone
        else:
            totals = self._read(self._totals, "total")
        cluster_max = self.limits.cluster_max
        most = capacity(totals, cluster_max)
        for name, value in sorted(wanted.items()):
            if value > most.get(name, 0.0) + EPSILON:
                configured = " (its autoscaler's maximum)" if name in cluster_max else ""
                raise JobTooLarge(
                    f"the job needs {describe(need)} and the cluster can never give more than "
                    f"{amount(most.get(name, 0.0))} {name}{configured}: it would wait forever. "
                    "Its workers come from the server's configuration (CORRAL_TRAIN_WORKERS, "
                    "CORRAL_TRAIN_USE_GPU); nothing was stored"
                )

    def admit_if_leader(self) -> AdmissionPass | None:
        """A pass right after a submission, if this replica holds the lease (or there is
        none: one replica); else None, and the holder's next pass admits the job."""
        if self._lease is not None and not self._lease.hold():
            return None
        return self.admit()

    # ------------------------------------------------------------------ the pass

    def admit(self) -> AdmissionPass:
        """One pass over the queue; the caller holds the lease. BackendUnavailable when
        Ray's resources cannot be read (nothing is admitted then)."""
        with self._lock:
            with self._db.transaction() as session:
                store = AdmissionStore(session)
                queue, committed = store.queued(), store.committed()
            if not queue:
                return AdmissionPass(admitted=[], waiting=[])
            totals = self._read(self._totals, "total")
            available = self._read(self._available, "available")
            cluster_max = self.limits.cluster_max
            decided = plan(
                queue,
                committed,
                free=free_resources(
                    available=available,
                    totals=totals,
                    committed=committed,
                    cluster_max=cluster_max,
                ),
                capacity=capacity(totals, cluster_max),
                limits=self.limits,
            )
            jobs = {job.key: job for job in queue}
            admitted = [key for key in decided.admit if self._admit_one(jobs[key])]
            self._record_waits(jobs, decided.waiting)
            return AdmissionPass(admitted=admitted, waiting=decided.waiting)

    def _admit_one(self, job: JobNeed) -> bool:
        with self._db.transaction() as session:
            if not AdmissionStore(session).admit(job.key):
                return False  # cancelled, or admitted elsewhere, meanwhile
            line = f"admitted: needs {describe(job.need)}"
            if job.queue_reason is not None:
                line += " (it was queued)"
            JobStore(session).append_log(job.key, line)
        try:
            self._launcher.submit(job.key, attempt=job.attempt)
        except BackendUnavailable as exc:
            # Admitted and stored: the reconciler submits it once Ray answers.
            log.warning("job %s admitted but not yet submitted: %s", job.key, exc)
            with self._db.transaction() as session:
                JobStore(session).append_log(job.key, f"waiting for Ray: {exc.message}")
        return True

    def _record_waits(self, jobs: Mapping[str, JobNeed], waiting: list[Waiting]) -> None:
        changed = [
            wait
            for wait in waiting
            if (jobs[wait.key].queue_position, jobs[wait.key].queue_reason)
            != (wait.position, wait.reason)
        ]
        if not changed:
            return
        with self._db.transaction() as session:
            store, job_store = AdmissionStore(session), JobStore(session)
            for wait in changed:
                store.place(wait.key, position=wait.position, reason=wait.reason)
                if jobs[wait.key].queue_reason is None:  # queued for the first time
                    job_store.append_log(wait.key, f"queued: {wait.reason}")

    def _read(self, counts: ClusterResources, what: str) -> dict[str, float]:
        try:
            return {str(name): float(value) for name, value in counts().items()}
        except BackendUnavailable:
            raise
        except Exception as exc:
            raise BackendUnavailable(
                f"the Ray cluster's {what} resources could not be read: {exc}"
            ) from exc
