"""The store's lease (corral/services/lease.py) on both backends: with two API "replicas"
on one database only the holder runs the reconciler and admission passes; a lost lease
stops them; expiry or a release lets the other take over; many contenders at once leave
exactly one holder."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest

from corral.services.admission import Admitter
from corral.services.jobs import JobsService
from corral.services.lease import Lease
from corral.services.reconciler import PeriodicReconciler, Reconciler
from corral.store.db import Database
from corral.store.jobs import JobKind
from corral.store.tables import Lease as LeaseRow
from corral.tenancy import job_key
from tests.services.admission_fakes import FakeCluster, FakeRay

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Replica:
    """One API replica: its own lease holder, reconciler and admitter on the shared
    database, Ray and cluster."""

    def __init__(
        self, name: str, database: Database, ray: FakeRay, cluster: FakeCluster, clock: Clock
    ) -> None:
        self.lease = Lease(database, holder=name, ttl_s=30, clock=clock)
        self.settles = 0
        reconciler = Reconciler(database=database, launcher=ray)
        settle = reconciler.settle

        def counted() -> list:  # type: ignore[type-arg]
            self.settles += 1
            return settle()

        reconciler.settle = counted  # type: ignore[method-assign]
        self.admitter = Admitter(
            database=database,
            launcher=ray,
            totals=cluster.cluster_resources,
            available=cluster.available_resources,
            lease=self.lease,
        )
        self.jobs = JobsService(database=database, launcher=ray, admitter=self.admitter)
        self.periodic = PeriodicReconciler(
            reconciler, interval_s=10, lease=self.lease, admitter=self.admitter
        )

    def submit(self, uuid: str) -> str:
        self.jobs.submit(
            tenant="t",
            job_uuid=uuid,
            kind=JobKind.SUPERVISED_FINE_TUNE,
            body={"uuid": uuid},
            plan=lambda: {"num_workers": 1, "use_gpu": False},
        )
        return job_key("t", uuid)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def _replicas(database: Database, clock: Clock) -> tuple[Replica, Replica, FakeRay]:
    ray, cluster = FakeRay(), FakeCluster(CPU=4.0)
    return (
        Replica("replica-1", database, ray, cluster, clock),
        Replica("replica-2", database, ray, cluster, clock),
        ray,
    )


def test_only_the_holder_runs_passes_and_renewing_keeps_it(
    database: Database, clock: Clock
) -> None:
    one, two, _ = _replicas(database, clock)
    assert one.periodic.run_once() is not None
    assert two.periodic.run_once() is None
    for _ in range(5):  # each pass renews: 10 s apart, well within 30
        clock.advance(10)
        assert one.periodic.run_once() is not None
        assert two.periodic.run_once() is None
    assert (one.settles, two.settles) == (6, 0)


def test_a_submission_on_a_replica_without_the_lease_waits_for_the_holders_pass(
    database: Database, clock: Clock
) -> None:
    one, two, ray = _replicas(database, clock)
    assert one.lease.hold()
    key = two.submit("job")
    assert ray.submitted == []  # stored and queued; replica 2 does not admit
    one.periodic.run_once()
    assert ray.submitted == [key]


def test_expiry_hands_the_lease_over_and_the_old_holder_stops(
    database: Database, clock: Clock
) -> None:
    one, two, _ = _replicas(database, clock)
    assert one.periodic.run_once() is not None
    clock.advance(29)
    assert two.periodic.run_once() is None  # not expired yet
    clock.advance(2)  # replica 1 stopped renewing (hung, or gone) 31 s ago
    assert two.periodic.run_once() is not None
    assert one.periodic.run_once() is None  # it lost the lease: its passes stop
    assert not one.lease.held and two.lease.held
    assert (one.settles, two.settles) == (1, 1)


def test_stopping_releases_the_lease_for_the_next_replica_at_once(
    database: Database, clock: Clock
) -> None:
    one, two, _ = _replicas(database, clock)
    assert one.periodic.run_once() is not None
    one.periodic.stop()  # its thread never started; stop releases all the same
    assert two.periodic.run_once() is not None


def test_many_contenders_at_once_leave_exactly_one_holder(database: Database, clock: Clock) -> None:
    leases = [Lease(database, holder=f"r{i}", ttl_s=30, clock=clock) for i in range(6)]
    results: list[bool] = []
    barrier = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        barrier.wait()
        results.append(lease.hold())

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 5 + [True]


def test_a_restarted_server_takes_the_lease_of_its_dead_predecessor_at_once(
    database: Database, clock: Clock
) -> None:
    """An API server killed and started again on the same host need not wait out the
    lease of the process it replaces; a live holder keeps it."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname()[:128].replace(":", "-")
        for pid, taken in ((alive.pid, False), (dead.pid, True)):
            previous = Lease(database, holder=f"{host}:{pid}:0123abcd", ttl_s=30, clock=clock)
            with database.transaction() as session:  # the predecessor's row, as it left it
                session.query(LeaseRow).delete()
            assert previous.hold()
            assert Lease(database, ttl_s=30, clock=clock).hold() is taken
    finally:
        alive.kill()
        alive.wait()
