"""Admission (corral/services/admission.py) against fakes of Ray: a cluster whose totals and
free resources the test sets (jobs hold their need while they run there) and a launcher
that implements `JobLauncher`; the store is real, on both backends. The order and the
reasons are also checked on `plan` alone, with plain values."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from corral.errors import JobTooLarge, QuotaExceeded, http_status_for
from corral.ray_jobs import RayJobInfo, RayJobState
from corral.services.admission import (
    AdmissionLimits,
    Admitter,
    Plan,
    capacity,
    free_resources,
    plan,
)
from corral.services.jobs import JobsService
from corral.services.reconciler import PeriodicReconciler, Reconciler
from corral.store.admission import JobNeed
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore
from corral.store.tables import Job
from corral.tenancy import job_key
from jobs.resources import SDG_STAGES, job_need, training_need
from jobs.sdg.pipeline import STAGES
from tests.services.admission_fakes import FakeCluster, FakeRay

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


class Setup:
    """A JobsService with an admitter over a fake cluster, and the moves a real job
    makes: it starts (row running, its need held), then finishes (Ray says SUCCEEDED,
    its need freed)."""

    def __init__(
        self, database: Database, cluster: FakeCluster, limits: AdmissionLimits | None = None
    ) -> None:
        self.database = database
        self.cluster = cluster
        self.ray = FakeRay()
        self.admitter = Admitter(
            database=database,
            launcher=self.ray,
            totals=cluster.cluster_resources,
            available=cluster.available_resources,
            limits=limits,
        )
        self.jobs = JobsService(database=database, launcher=self.ray, admitter=self.admitter)
        self.periodic = PeriodicReconciler(
            Reconciler(database=database, launcher=self.ray),
            interval_s=60,
            admitter=self.admitter,
        )

    def submit(
        self,
        uuid: str,
        *,
        tenant: str = "a",
        workers: int = 1,
        gpu: bool = False,
        kind: JobKind = JobKind.SUPERVISED_FINE_TUNE,
    ) -> str:
        launch: dict[str, Any] = {"num_workers": workers, "use_gpu": gpu}
        self.jobs.submit(
            tenant=tenant, job_uuid=uuid, kind=kind, body={"uuid": uuid}, plan=lambda: launch
        )
        return job_key(tenant, uuid)

    def start(self, key: str) -> None:
        with self.database.transaction() as session:
            assert JobStore(session).transition(key, to=JobStatus.RUNNING).applied
            need = session.get(Job, key).need  # type: ignore[union-attr]
        self.cluster.held[key] = need
        self.ray.states[key] = RayJobInfo(RayJobState.RUNNING)

    def finish(self, key: str) -> None:
        """The job's process ends: its workers are gone; the row is the reconciler's."""
        self.cluster.held.pop(key)
        self.ray.states[key] = RayJobInfo(RayJobState.SUCCEEDED)

    def row(self, key: str) -> Job:
        with self.database.transaction() as session:
            job = session.get(Job, key)
            assert job is not None
            return job

    def place(self, key: str) -> tuple[int | None, str | None]:
        job = self.row(key)
        return job.queue_position, job.queue_reason

    def stored(self) -> int:
        with self.database.transaction() as session:
            return session.query(Job).count()


# ------------------------------------------------------------------ the need


def test_a_jobs_need_is_what_its_recipe_reserves() -> None:
    assert job_need("supervised_fine_tune", {"num_workers": 4, "use_gpu": True}) == {"GPU": 4.0}
    assert job_need("preference_optimize", {"num_workers": 3, "use_gpu": False}) == {"CPU": 3.0}
    assert job_need("synthetic_data_generation", {}) == {"CPU": 0.15}
    assert training_need(2, True) == {"GPU": 2.0}
    assert len(STAGES) == SDG_STAGES  # one actor per pipeline stage


# ------------------------------------------------------------------ refusal


def test_a_job_needing_more_than_the_cluster_has_in_all_is_refused_and_nothing_stored(
    database: Database,
) -> None:
    setup = Setup(database, FakeCluster(CPU=4.0))
    with pytest.raises(JobTooLarge) as refused:
        setup.submit("big", workers=5)
    assert http_status_for(refused.value) == 422
    assert "needs 5 CPU" in refused.value.message and "never" in refused.value.message
    with pytest.raises(JobTooLarge):
        setup.submit("gpu", workers=1, gpu=True)  # no GPUs at all
    assert setup.stored() == 0 and setup.ray.submitted == []


def test_the_autoscalers_maximum_is_what_the_cluster_can_give(database: Database) -> None:
    """With a maximum configured, a job bigger than the cluster is now but within it is
    admitted (its pending placement makes the autoscaler add nodes); bigger than the
    maximum, refused."""
    cluster = FakeCluster(CPU=8.0, GPU=2.0)
    setup = Setup(database, cluster, AdmissionLimits(cluster_max={"GPU": 8.0}))
    key = setup.submit("scale-up", workers=6, gpu=True)
    assert setup.ray.submitted == [key]  # 2 free now, 6 more the autoscaler can add
    with pytest.raises(JobTooLarge) as refused:
        setup.submit("beyond", workers=9, gpu=True)
    assert "8 GPU (its autoscaler's maximum)" in refused.value.message
    assert setup.stored() == 1


def test_with_every_needed_maximum_configured_ray_is_not_asked_at_submission(
    database: Database,
) -> None:
    def unreachable() -> dict[str, float]:
        raise ConnectionError("no Ray")

    admitter = Admitter(
        database=database,
        launcher=FakeRay(),
        totals=unreachable,
        available=unreachable,
        limits=AdmissionLimits(cluster_max={"GPU": 4.0}),
    )
    admitter.check(need={"GPU": 4.0})
    with pytest.raises(JobTooLarge):
        admitter.check(need={"GPU": 5.0})


def test_a_job_needing_more_gpus_than_its_tenant_may_hold_is_refused(database: Database) -> None:
    setup = Setup(database, FakeCluster(GPU=8.0), AdmissionLimits(tenant_max_job_gpus=2))
    with pytest.raises(QuotaExceeded) as refused:
        setup.submit("greedy", workers=3, gpu=True)
    assert http_status_for(refused.value) == 403
    assert setup.stored() == 0


# ------------------------------------------------------------------ queueing


def test_a_job_that_does_not_fit_now_waits_with_a_reason_and_its_place(
    database: Database,
) -> None:
    setup = Setup(database, FakeCluster(GPU=3.0))
    first = setup.submit("first", workers=2, gpu=True)
    assert setup.ray.submitted == [first]
    second = setup.submit("second", tenant="b", workers=2, gpu=True)
    third = setup.submit("third", tenant="c", workers=1, gpu=True)
    # The one free GPU is kept for `second`, ahead of `third` in the queue.
    assert setup.ray.submitted == [first]
    assert setup.place(second) == (1, "waiting for 2 GPU; 1 free")
    assert setup.place(third) == (2, "waiting for 1 GPU; 0 free after 1 kept for jobs ahead of it")
    summary = setup.jobs.get(tenant="b", job_uuid="second")
    assert (summary.status, summary.queue_position) == ("scheduled", 1)
    assert summary.queue_reason == "waiting for 2 GPU; 1 free" and summary.admitted_at is None
    assert summary.need == {"GPU": 2.0}
    assert setup.jobs.get(tenant="a", job_uuid="first").queue_reason is None
    assert setup.jobs.logs(tenant="b", job_uuid="second").log_lines == [
        "queued: waiting for 2 GPU; 1 free"
    ]


def test_a_finished_job_frees_its_resources_for_the_next_in_the_queue(
    database: Database,
) -> None:
    setup = Setup(database, FakeCluster(CPU=4.0))
    first = setup.submit("first", workers=3)
    second = setup.submit("second", workers=3)
    setup.start(first)
    setup.periodic.run_once()
    assert setup.ray.submitted == [first] and setup.place(second)[0] == 1

    setup.finish(first)
    setup.periodic.run_once()  # settles `first` as completed, then admits `second`

    assert JobStatus(setup.row(first).status) is JobStatus.COMPLETED
    assert setup.ray.submitted == [first, second]
    row = setup.row(second)
    assert row.admitted_at is not None and (row.queue_position, row.queue_reason) == (None, None)
    lines = setup.jobs.logs(tenant="a", job_uuid="second").log_lines
    assert lines == ["queued: waiting for 3 CPU; 1 free", "admitted: needs 3 CPU (it was queued)"]


def test_an_admitted_job_counts_as_held_until_its_workers_are_placed(database: Database) -> None:
    """Ray's free count does not drop until a job's workers are placed; the admitted
    job's need is counted in the meantime, while scheduled and once it says running."""
    cluster = FakeCluster(CPU=4.0)
    setup = Setup(database, cluster)
    first = setup.submit("first", workers=3)
    second = setup.submit("second", workers=3)  # Ray still shows 4 CPU free
    assert setup.ray.submitted == [first]
    with database.transaction() as session:
        JobStore(session).transition(first, to=JobStatus.RUNNING)  # not placed yet
    setup.admitter.admit()
    assert setup.ray.submitted == [first] and setup.place(second)[1] == (
        "waiting for 3 CPU; 1 free"
    )


def test_resources_held_outside_corral_count(database: Database) -> None:
    cluster = FakeCluster(CPU=4.0)
    cluster.other = {"CPU": 2.5}  # Serve replicas
    setup = Setup(database, cluster)
    key = setup.submit("job", workers=2)
    assert setup.ray.submitted == [] and setup.place(key)[1] == "waiting for 2 CPU; 1.5 free"


def test_the_reconciler_never_submits_a_queued_job(database: Database) -> None:
    """A queued row has no Ray job: the reconciler leaves it to admission without asking
    Ray; an admitted one whose submission was lost is submitted."""
    setup = Setup(database, FakeCluster(CPU=1.0))
    admitted = setup.submit("admitted", workers=1)
    waiting = setup.submit("waiting", workers=1)
    setup.ray.states.clear()  # Ray lost `admitted` (restarted) before it started
    setup.ray.submitted.clear()

    reconciler = Reconciler(database=database, launcher=setup.ray)
    settled = {s.job_key: s.action for s in reconciler.settle()}

    assert settled == {admitted: "submitted", waiting: "queued"}
    assert setup.ray.submitted == [admitted] and waiting not in setup.ray.asked


def test_a_job_cancelled_while_queued_is_never_admitted(database: Database) -> None:
    cluster = FakeCluster(CPU=2.0)
    setup = Setup(database, cluster)
    cluster.other = {"CPU": 2.0}
    key = setup.submit("job", workers=1)
    setup.jobs.cancel(tenant="a", job_uuid="job")
    cluster.other = {}
    assert setup.admitter.admit().admitted == []
    assert setup.ray.submitted == [] and setup.row(key).admitted_at is None
    assert setup.jobs.get(tenant="a", job_uuid="job").queue_reason is None


def test_tenants_take_turns_and_each_tenants_jobs_keep_their_order(database: Database) -> None:
    cluster = FakeCluster(CPU=1.0)
    setup = Setup(database, cluster)
    cluster.other = {"CPU": 1.0}  # nothing fits: the pass only orders the queue
    keys = [
        setup.submit("a1", tenant="a"),
        setup.submit("a2", tenant="a"),
        setup.submit("a3", tenant="a"),
        setup.submit("b1", tenant="b"),
        setup.submit("c1", tenant="c"),
        setup.submit("c2", tenant="c"),
    ]
    order = sorted(keys, key=lambda key: setup.place(key)[0] or 0)
    assert order == [job_key(t, u) for t, u in [("a", "a1"), ("b", "b1"), ("c", "c1")]] + [
        job_key(t, u) for t, u in [("a", "a2"), ("c", "c2"), ("a", "a3")]
    ]
    cluster.other = {}
    assert setup.admitter.admit().admitted == [job_key("a", "a1")]
    assert setup.place(job_key("b", "b1"))[0] == 1  # b's turn next, not a2's


def test_a_tenant_at_its_limit_waits_and_others_go_on(database: Database) -> None:
    setup = Setup(database, FakeCluster(CPU=8.0), AdmissionLimits(tenant_max_running_jobs=1))
    a1 = setup.submit("a1", tenant="a")
    a2 = setup.submit("a2", tenant="a")
    b1 = setup.submit("b1", tenant="b")
    assert setup.ray.submitted == [a1, b1]
    assert setup.place(a2) == (
        1,
        "at the tenant's limit of 1 unfinished job; waiting for one to end",
    )
    setup.start(a1)
    setup.finish(a1)
    setup.periodic.run_once()
    assert setup.ray.submitted == [a1, b1, a2]


def test_a_tenants_gpu_limit_counts_what_its_admitted_jobs_hold(database: Database) -> None:
    setup = Setup(database, FakeCluster(GPU=8.0), AdmissionLimits(tenant_max_job_gpus=3))
    a1 = setup.submit("a1", tenant="a", workers=2, gpu=True)
    a2 = setup.submit("a2", tenant="a", workers=2, gpu=True)
    a3 = setup.submit("a3", tenant="a", workers=1, gpu=True)
    b1 = setup.submit("b1", tenant="b", workers=3, gpu=True)
    assert setup.ray.submitted == [a1, b1]
    assert setup.place(a2)[1] == (
        "waiting for 2 GPU within the tenant's limit of 3; its jobs hold 2"
    )
    # a3 alone would fit a's limit, but nothing passes a's earlier job.
    assert setup.place(a3)[1] == "behind this tenant's earlier job 'a2'"


# ------------------------------------------------------------------ the order, on `plan`


def _need(key: str, tenant: str, minute: int, **need: float) -> JobNeed:
    return JobNeed(
        key=key,
        uuid=key,
        tenant=tenant,
        status=JobStatus.SCHEDULED,
        scheduled_at=T0 + timedelta(minutes=minute),
        attempt=0,
        need=dict(need),
    )


def _running(key: str, tenant: str, **need: float) -> JobNeed:
    return JobNeed(
        key=key,
        uuid=key,
        tenant=tenant,
        status=JobStatus.RUNNING,
        scheduled_at=T0,
        attempt=0,
        need=dict(need),
    )


def _plan(queue: list[JobNeed], committed: Sequence[JobNeed] = (), **free: float) -> Plan:
    return plan(
        queue,
        list(committed),
        free=free,
        capacity={"CPU": 64.0, "GPU": 8.0},
        limits=AdmissionLimits(),
    )


def test_a_big_job_at_the_head_is_not_starved_by_small_ones() -> None:
    """The head waits for 4 GPUs with 2 free: a 1-GPU job behind it may not take them
    (however many come), a CPU job may (the head does not need CPUs)."""
    queue = [
        _need("big", "a", 0, GPU=4),
        _need("small", "b", 1, GPU=1),
        _need("cpu", "c", 2, CPU=1),
        _need("small2", "d", 3, GPU=1),
    ]
    decided = _plan(queue, GPU=2, CPU=8)
    assert decided.admit == ["cpu"]
    assert [(w.key, w.position) for w in decided.waiting] == [
        ("big", 1),
        ("small", 2),
        ("small2", 3),
    ]
    assert decided.waiting[0].reason == "waiting for 4 GPU; 2 free"
    assert (
        decided.waiting[1].reason == "waiting for 1 GPU; 0 free after 2 kept for jobs ahead of it"
    )
    # Once 4 are free the head goes first, and what is left goes on in order.
    assert _plan(queue, GPU=5, CPU=8).admit == ["big", "small", "cpu"]


def test_a_tenant_running_more_jobs_yields_to_one_running_fewer() -> None:
    queue = [_need("a-next", "a", 0, CPU=1), _need("b-first", "b", 5, CPU=1)]
    committed = [_running("a-1", "a", CPU=1), _running("a-2", "a", CPU=1)]
    assert _plan(queue, committed, CPU=1).admit == ["b-first"]
    # ...but not forever: with one running each, the earlier submission goes first.
    assert _plan(queue, [*committed[:1], _running("b-0", "b", CPU=1)], CPU=1).admit == ["a-next"]


def test_a_job_bigger_than_the_cluster_is_now_waits_without_blocking_others() -> None:
    queue = [_need("huge", "a", 0, GPU=16), _need("small", "b", 1, GPU=1)]
    decided = _plan(queue, GPU=2)
    assert decided.admit == ["small"]
    assert decided.waiting[0].reason == "needs 16 GPU; the cluster has 8 in all now"


def test_free_is_what_ray_has_less_what_admitted_jobs_are_about_to_take() -> None:
    committed = [
        _need("pending", "a", 0, GPU=2),  # admitted, workers not placed: Ray still shows it
        _running("unplaced", "b", GPU=1),  # running, workers not placed yet either
    ]
    free = free_resources(
        available={"GPU": 4.0, "CPU": 8.0},
        totals={"GPU": 4.0, "CPU": 8.0},
        committed=committed,
        cluster_max={"GPU": 6.0},
    )
    # min(4 - 2, 4 - 3) + (6 - 4) GPU; CPU as Ray says.
    assert free == {"GPU": 3.0, "CPU": 8.0}
    assert capacity({"GPU": 4.0}, {"GPU": 6.0, "CPU": 2.0}) == {"GPU": 6.0, "CPU": 2.0}
