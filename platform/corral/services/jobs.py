"""The lifecycle every job kind shares: idempotent submission to Ray, listing, one job's
summary (progress from its metrics), log lines, per-step metrics, and cancellation.

A kind's own service (post-training today, synthetic data next) checks and plans its
requests and hands them to `submit`; everything after that is here. Every read may be
narrowed to some kinds (`kinds`): a job of another kind is NotFound there, as if it did
not exist, so an API area shows its own jobs only."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from corral.api.jobs import JobList, JobLogs, JobMetric, JobMetrics, JobProgress, JobSummary
from corral.errors import BackendUnavailable, CapabilityUnavailable, Conflict
from corral.observability.context import bind_job
from corral.ray_jobs import JobLauncher, submission_id
from corral.services.admission import Admitter
from corral.services.ids import check_id
from corral.storage import Storage
from corral.store.db import Database
from corral.store.jobs import JobKind, JobStatus, JobStore, Progress
from corral.store.tables import Job
from jobs.logger_config import TENSORBOARD_DIR, tensorboard_dir
from jobs.resources import job_need

log = logging.getLogger(__name__)

Kinds = Sequence[JobKind]


class JobsService:
    def __init__(
        self,
        *,
        database: Database,
        launcher: JobLauncher | None = None,
        storage: Storage | None = None,
        admitter: Admitter | None = None,
    ) -> None:
        """Without a launcher (no Ray connection) jobs can be read but not submitted, and
        a cancellation is recorded for the reconciler to carry out. `storage` gives the
        URLs of jobs' files in object storage. With an `admitter` (services/admission.py)
        a job is refused when the cluster can never run it, and queued until it fits;
        without one (no view of Ray's resources) every job is handed to Ray at once."""
        self._db = database
        self._launcher = launcher
        self._storage = storage
        self._admitter = admitter

    def submit(
        self,
        *,
        tenant: str,
        job_uuid: str,
        kind: JobKind,
        body: dict[str, Any],
        plan: Callable[[], dict[str, Any]],
    ) -> None:
        """Store a scheduled job and admit it (hand it to Ray) if it fits now; else it
        stays queued. The same request again changes nothing; the same uuid with another
        request is a Conflict. `plan()` turns the request into the job's launch config
        (raising for a bad request); it runs only for a new job, outside any transaction.
        Nothing is stored unless it succeeds and the cluster could ever run the job."""
        if self._launcher is None:
            raise CapabilityUnavailable(kind.value, "this server has no Ray connection")
        check_id(job_uuid, what="job_uuid")
        with self._db.transaction() as session:
            found = JobStore(session).same_request(
                tenant=tenant, job_uuid=job_uuid, kind=kind, request=body
            )
            if found is not None:
                bind_job(job_uuid=job_uuid, job_key=found.key)
                return  # the same request again: nothing to do
        launch = plan()
        need = job_need(kind.value, launch)
        if self._admitter is not None:
            self._admitter.check(need=need)  # JobTooLarge: it would wait forever
        with self._db.transaction() as session:
            created = JobStore(session).create(
                job_uuid=job_uuid,
                tenant=tenant,
                kind=kind,
                request=body,
                launch=launch,
                need=need,
                admitted=self._admitter is None,
            )
            key = created.job.key
            bind_job(job_uuid=job_uuid, job_key=key)
        if not created.created:
            return  # a concurrent submission of the same request stored it first
        if self._admitter is not None:
            try:
                self._admitter.admit_if_leader()
            except Exception as exc:  # stored and queued: the next periodic pass admits it
                log.warning("job %s queued; no admission pass now: %s", key, exc)
            return
        try:
            self._launcher.submit(key)
        except BackendUnavailable as exc:
            # The row is stored and scheduled: the reconciler submits it once Ray answers.
            log.warning("job %s stored but not yet submitted: %s", key, exc)
            with self._db.transaction() as session:
                JobStore(session).append_log(key, f"waiting for Ray: {exc.message}")

    def list(
        self,
        *,
        tenant: str,
        kinds: Kinds = (),
        statuses: Sequence[JobStatus] = (),
        limit: int,
        offset: int,
    ) -> JobList:
        """The tenant's jobs, newest first; empty `kinds` or `statuses` mean any."""
        with self._db.transaction() as session:
            store = JobStore(session)
            jobs = store.find(
                tenant=tenant, kinds=kinds, statuses=statuses, limit=limit + 1, offset=offset
            )
            page = jobs[:limit]
            counts = store.checkpoint_counts([job.key for job in page])
            progress = store.progress_of(page)
            summaries = [
                _summary(job, counts.get(job.key, 0), self._storage, progress=progress.get(job.key))
                for job in page
            ]
        return JobList(data=summaries, next_offset=offset + limit if len(jobs) > limit else None)

    def get(self, *, tenant: str, job_uuid: str, kinds: Kinds = ()) -> JobSummary:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant, kinds=kinds)
            bind_job(job_uuid=job.uuid, job_key=job.key)
            counts = store.checkpoint_counts([job.key])
            return _summary(
                job, counts.get(job.key, 0), self._storage, progress=store.progress(job)
            )

    def logs(self, *, tenant: str, job_uuid: str, kinds: Kinds = ()) -> JobLogs:
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant, kinds=kinds)
            bind_job(job_uuid=job.uuid, job_key=job.key)
            lines = [line.line for line in store.log_lines(job.key)]
            return JobLogs(job_uuid=job.uuid, log_lines=lines)

    def metrics(
        self,
        *,
        tenant: str,
        job_uuid: str,
        after_step: int | None = None,
        limit: int,
        kinds: Kinds = (),
    ) -> JobMetrics:
        """The job's per-step metrics in step order, a page of `limit` steps after
        `after_step`; `next_after_step` continues where the page stops."""
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.get(job_uuid, tenant=tenant, kinds=kinds)
            bind_job(job_uuid=job.uuid, job_key=job.key)
            rows = store.metrics(job.key, after_step=after_step, limit=limit + 1)
            page = [
                JobMetric(
                    step=row.step, epoch=row.epoch, recorded_at=row.recorded_at, values=row.values
                )
                for row in rows[:limit]
            ]
        more = len(rows) > limit
        return JobMetrics(
            job_uuid=job_uuid, data=page, next_after_step=page[-1].step if more else None
        )

    def cancel(self, *, tenant: str, job_uuid: str, kinds: Kinds = ()) -> JobSummary:
        """Record the cancellation first (so a late completion cannot overwrite it), with a
        pending stop, then stop the Ray job, which frees its workers. The cancellation
        holds once recorded: if Ray cannot be reached now, the answer still says
        `cancelled`, with `stop_pending` true, and the reconciler stops the Ray job when
        Ray answers again. Cancelling a cancelled job only asks Ray to stop again; a job
        that already completed or failed is a Conflict."""
        with self._db.transaction() as session:
            store = JobStore(session)
            # NotFound for another tenant's (or another kind's) job.
            job = store.get(job_uuid, tenant=tenant, kinds=kinds)
            bind_job(job_uuid=job.uuid, job_key=job.key)
            key, run_id = job.key, submission_id(job.key, job.attempt)
            outcome = store.transition(key, to=JobStatus.CANCELLED, error="cancelled")
            if outcome.applied:
                store.set_stop_pending(key, True)
                store.append_log(key, "cancelled on request")
        if not outcome.applied and outcome.status is not JobStatus.CANCELLED:
            raise Conflict(f"job {job_uuid!r} already {outcome.status.value}; nothing to cancel")
        if self._launcher is not None:
            try:
                self._launcher.stop(run_id)
            except BackendUnavailable as exc:
                log.warning("job %s cancelled; its Ray job is stopped later: %s", key, exc)
                with self._db.transaction() as session:
                    JobStore(session).append_log(
                        key,
                        f"Ray could not be reached to stop the job ({exc.message}); "
                        "it is stopped once Ray answers",
                    )
        return self.get(tenant=tenant, job_uuid=job_uuid, kinds=kinds)

    def counts(self) -> dict[tuple[str, str], int]:
        """Jobs of every tenant by (kind, status), zeros included (the operators' metrics)."""
        with self._db.transaction() as session:
            counts = JobStore(session).counts()
        return {(kind.value, status.value): n for (kind, status), n in counts.items()}


def _summary(
    job: Job, checkpoints: int, storage: Storage | None, *, progress: Progress | None = None
) -> JobSummary:
    return JobSummary.model_validate(
        {
            "job_uuid": job.uuid,
            "kind": job.kind,
            "status": job.status,
            "scheduled_at": job.scheduled_at,
            "started_at": job.started_at,
            "completed_at": job.completed_at,
            "error": job.error,
            "attempt": job.attempt,
            "stop_pending": job.stop_pending,
            "checkpoints": checkpoints,
            "progress": (
                JobProgress(
                    step=progress.step, total_steps=progress.total_steps, loss=progress.loss
                )
                if progress is not None
                else None
            ),
            "tensorboard_url": _tensorboard_url(job, storage),
            "need": job.need,
            "admitted_at": job.admitted_at,
            **queue_place(job),
        }
    )


def queue_place(job: Job) -> dict[str, Any]:
    """A queued job's place (1: next) and why it waits, as the last admission pass
    wrote them; both None once it is admitted (or before a pass has seen it: a reason
    says so)."""
    if job.status != JobStatus.SCHEDULED.value or job.admitted_at is not None:
        return {"queue_position": None, "queue_reason": None}
    return {
        "queue_position": job.queue_position,
        "queue_reason": job.queue_reason or "queued: waiting for the next admission pass",
    }


def _tensorboard_url(job: Job, storage: Storage | None) -> str | None:
    """Where the job's TensorBoard files are, if it writes any: beside its checkpoints,
    in object storage when the job has a URI there (jobs/checkpointer.py uploads them)."""
    directory = tensorboard_dir(job)
    if directory is None:
        return None
    uri = (job.launch or {}).get("output_uri")
    if isinstance(uri, str) and storage is not None:
        return storage.directory_url(f"{uri}/{TENSORBOARD_DIR}")
    return directory.resolve().as_uri()
