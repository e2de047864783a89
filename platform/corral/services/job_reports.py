"""What a running job may read and write of its own row, and nothing else: its launch
config, lifecycle moves (through `JobStore.transition`, so a cancelled job cannot mark
itself completed), log lines, the planned steps, per-step metrics, checkpoints (only
inside its own directory of storage) and, for a generation job, its dataset.

Two callers share it, so a job behaves the same whichever way it reports: the internal
routes (`corral.routes.internal_jobs`, a job authenticated by its token) and
`jobs.transport.DatabaseTransport` (a recipe run in-process, in tests). Each call is its
own transaction: what was reported survives a crash a moment later."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.api.datasets import Dataset
from corral.errors import Conflict, Forbidden, InvalidRequest
from corral.storage import InvalidLocation, Storage, lies_within, parse_location
from corral.store.datasets import DatasetStore
from corral.store.db import Database
from corral.store.digest import request_digest
from corral.store.jobs import JobKind, JobStatus, JobStore, TransitionOutcome
from corral.store.tables import Job
from jobs.logger_config import tensorboard_dir
from jobs.sdg.config import DatasetOutput
from jobs.sdg.dataset import COLUMNS
from jobs.sdg.files import DATA_FILE, STATISTICS_FILE
from serve_apps.model_cache import StorageOptions

# The moves a job makes itself; scheduling, requeueing and cancelling are the server's.
JOB_MOVES = frozenset({JobStatus.RUNNING, JobStatus.COMPLETED, JobStatus.FAILED})


@dataclass(frozen=True)
class JobLaunch:
    kind: JobKind
    attempt: int
    launch: dict[str, Any]
    tensorboard_dir: str | None


@dataclass(frozen=True)
class JobState:
    status: JobStatus
    attempt: int


@dataclass(frozen=True)
class CheckpointRecord:
    iters: int
    path: str


class JobReports:
    """One job's own reads and writes, by its key (`Job.key`). NotFound for a key with
    no row; the caller has already established that the key is the caller's own."""

    def __init__(self, *, database: Database) -> None:
        self._db = database

    def launch(self, key: str) -> JobLaunch:
        with self._db.transaction() as session:
            job = JobStore(session).by_key(key)
            directory = tensorboard_dir(job)
            return JobLaunch(
                kind=JobKind(job.kind),
                attempt=job.attempt,
                launch=dict(job.launch or {}),
                tensorboard_dir=str(directory) if directory is not None else None,
            )

    def transition(
        self,
        key: str,
        *,
        to: JobStatus,
        error: str | None = None,
        resources_allocated: dict[str, Any] | None = None,
    ) -> TransitionOutcome:
        if to not in JOB_MOVES:
            raise InvalidRequest(f"a job cannot move itself to {to.value}")
        with self._db.transaction() as session:
            return JobStore(session).transition(
                key, to=to, error=error, resources_allocated=resources_allocated
            )

    def log(self, key: str, *lines: str) -> None:
        with self._db.transaction() as session:
            store = JobStore(session)
            store.by_key(key)  # NotFound rather than a foreign-key error
            store.append_log(key, *lines)

    def plan(self, key: str, *, total_steps: int, detail: str = "") -> None:
        """The number of steps the run will take (what progress counts to)."""
        with self._db.transaction() as session:
            store = JobStore(session)
            store.by_key(key)
            store.set_total_steps(key, total_steps)
            store.append_log(key, f"plan: {total_steps} steps" + (f" ({detail})" if detail else ""))

    def metrics(self, key: str, *, step: int, epoch: int | None, values: dict[str, float]) -> None:
        with self._db.transaction() as session:
            store = JobStore(session)
            store.by_key(key)
            store.record_metrics(key, step=step, epoch=epoch, values=values)

    def checkpoint(
        self, key: str, *, iters: int, path: str, metrics: dict[str, Any] | None = None
    ) -> None:
        """Record a checkpoint the job wrote, which must lie inside the job's own
        directory of storage (Forbidden otherwise). The same checkpoint reported again
        (a retried call) is recorded once; another path for the same step is a Conflict."""
        with self._db.transaction() as session:
            store = JobStore(session)
            job = store.by_key(key)
            _check_own_location(job, path)
            for existing in store.checkpoints(key):
                if existing.iters == iters:
                    if existing.path == path:
                        return
                    raise Conflict(f"checkpoint {iters} is already recorded at another path")
            store.add_checkpoint(key, iters=iters, path=path, metrics=metrics)

    def checkpoints(self, key: str) -> list[CheckpointRecord]:
        with self._db.transaction() as session:
            store = JobStore(session)
            store.by_key(key)
            return [CheckpointRecord(c.iters, c.path) for c in store.checkpoints(key)]

    def state(self, key: str) -> JobState:
        """The job's status (what a job checks to stop when it was cancelled) and its
        attempt (which Ray Train run it is)."""
        with self._db.transaction() as session:
            job = JobStore(session).by_key(key)
            return JobState(status=JobStatus(job.status), attempt=job.attempt)

    def complete_with_dataset(
        self, key: str, *, row_count: int, content_sha256: str
    ) -> TransitionOutcome:
        """A generation job's end: register the dataset it wrote in its own directory
        (`data.jsonl`, with `statistics.json` beside it) for its tenant and complete the
        job, in one transaction: both or neither. Which dataset and where come from the
        stored launch config, not from the job. A dataset of that id with the same
        columns and content is left as it is; another one is a Conflict. A job no longer
        running is not completed and registers nothing (the outcome says so)."""
        with self._db.transaction() as session:
            jobs = JobStore(session)
            job = jobs.by_key(key)
            if JobKind(job.kind) is not JobKind.SYNTHETIC_DATA_GENERATION:
                raise InvalidRequest("only a generation job registers a dataset")
            launch = job.launch or {}
            output = DatasetOutput.model_validate(launch.get("output") or {})
            storage = _job_storage(job)
            dataset_id = output.dataset_id or job.uuid
            columns = COLUMNS[output.format]
            dataset = Dataset.model_validate(
                {
                    "columns": columns,
                    "content_url": storage.file_url(storage.root.child(DATA_FILE).uri),
                    "metadata": {
                        "format": "jsonl",
                        "content_sha256": content_sha256,
                        "synthetic_data_generation_job": job.uuid,
                        "statistics_url": storage.file_url(storage.root.child(STATISTICS_FILE).uri),
                    },
                }
            )
            datasets = DatasetStore(session)
            existing = datasets.get(tenant=job.tenant, uuid=dataset_id)
            if existing is not None and (
                existing.columns != columns
                or (existing.metadata_ or {}).get("content_sha256") != content_sha256
            ):
                raise Conflict(f"dataset {dataset_id!r} already exists with other content")
            completed = jobs.transition(key, to=JobStatus.COMPLETED)
            if not completed.applied:
                return completed
            if existing is None:
                body = dataset.model_dump(mode="json")
                datasets.add(
                    tenant=job.tenant,
                    uuid=dataset_id,
                    columns=body["columns"],
                    content_url=body["content_url"],
                    metadata=body["metadata"],
                    request_digest=request_digest(body),
                    row_count=row_count,
                )
            jobs.append_log(
                key,
                f"dataset {dataset_id!r} registered ({row_count} rows)"
                if existing is None
                else f"dataset {dataset_id!r} was already registered with this content",
            )
            return completed


def job_root(job: Job) -> str | None:
    """The job's own directory of storage, as its stored launch config names it: its
    `output_uri` in object storage, else its `output_dir` (corral.services.fine_tuning
    `job_output`). None for a job launched without one."""
    launch = job.launch or {}
    root = launch.get("output_uri") or launch.get("output_dir")
    return root if isinstance(root, str) and root else None


def _job_storage(job: Job) -> Storage:
    root = job_root(job)
    if root is None:
        raise InvalidRequest("the job has no directory of its own in storage")
    options = StorageOptions.model_validate((job.launch or {}).get("storage") or {})
    return Storage(root, options=options)


def _check_own_location(job: Job, path: str) -> None:
    """Refuse a location outside the job's own directory, judged as written and, on a
    local disk, with its links resolved too (as corral.storage judges a tenant's own)."""
    root = job_root(job)
    if root is None:
        raise Forbidden("the job has no directory of its own in storage")
    try:
        inside = lies_within(path, parse_location(root))
    except InvalidLocation as exc:
        raise InvalidRequest(f"checkpoint path: {exc}") from None
    if not inside:
        raise Forbidden("a checkpoint must lie inside the job's own directory")
