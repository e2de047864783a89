"""Fakes of Ray for admission tests: a cluster whose resource counts the test sets, and
a launcher that implements `JobLauncher` (the real one is tested against a real cluster in
test_reconciler.py)."""

from __future__ import annotations

from corral.ray_jobs import RayJobInfo, RayJobState, submission_id


class FakeCluster:
    """Ray's resource counts: `totals`, less what running jobs hold and `other` holds
    (Serve replicas, say)."""

    def __init__(self, **totals: float) -> None:
        self.totals = dict(totals)
        self.held: dict[str, dict[str, float]] = {}
        self.other: dict[str, float] = {}

    def cluster_resources(self) -> dict[str, float]:
        return dict(self.totals)

    def available_resources(self) -> dict[str, float]:
        free = dict(self.totals)
        for need in [*self.held.values(), self.other]:
            for name, value in need.items():
                free[name] = free.get(name, 0.0) - value
        return free


class FakeRay:
    """A `JobLauncher`: a submitted job is PENDING in 'Ray' until the test runs it."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.asked: list[str] = []
        self.states: dict[str, RayJobInfo] = {}

    def submit(self, job_key: str, *, attempt: int = 0) -> bool:
        run_id = submission_id(job_key, attempt)
        if run_id in self.states:
            return False
        self.submitted.append(run_id)
        self.states[run_id] = RayJobInfo(RayJobState.PENDING)
        return True

    def info(self, submission_id: str) -> RayJobInfo | None:
        self.asked.append(submission_id)
        return self.states.get(submission_id)

    def stop(self, submission_id: str) -> bool:
        return False
