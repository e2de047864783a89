"""SQLAlchemy models. The schema changes only through a migration in `migrations/`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Named constraints make migrations reproducible across SQLite and PostgreSQL.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UUID_LENGTH = 128
TENANT_LENGTH = 64
# `corral.tenancy.job_key`: a tenant slug (at most 41 characters), "_" and the uuid.
JOB_KEY_LENGTH = 192
JOB_STATUSES = ("scheduled", "running", "completed", "failed", "cancelled")
JOB_KINDS = ("supervised_fine_tune", "preference_optimize", "synthetic_data_generation")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# SQLite only auto-increments INTEGER PRIMARY KEY, so BIGINT ids are INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class Job(Base):
    """One fine-tuning, preference-optimization or synthetic-data job; the row is the truth.

    Clients name jobs by `uuid` within their tenant; everything outside the store (the Ray
    submission id, the run name, log lines and checkpoints here) names it by `key`."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES!r}", name="status"),
        CheckConstraint(f"kind IN {JOB_KINDS!r}", name="kind"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
        UniqueConstraint("tenant", "uuid"),
    )

    key: Mapped[str] = mapped_column(String(JOB_KEY_LENGTH), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(UUID_LENGTH))
    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    request: Mapped[dict[str, Any]]
    # sha256 of the canonical request JSON: the same uuid with another body is a conflict.
    request_digest: Mapped[str] = mapped_column(String(64))
    scheduled_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    resources_allocated: Mapped[dict[str, Any] | None]
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # What the job process runs: the request resolved by the API (model directory,
    # dataset rows, recipe settings). Never sent back to clients.
    launch: Mapped[dict[str, Any] | None]
    # Cancelled while its Ray job may still run: the reconciler stops that Ray job and
    # clears this once Ray says it has ended.
    stop_pending: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The optimizer steps the run plans to take (`JobReporter.plan`): what progress counts to.
    total_steps: Mapped[int | None] = mapped_column(Integer)
    # Admission (corral/services/admission.py): what the job holds on the cluster while it
    # runs (Ray resource name -> amount; jobs/resources.py), and when it was let through
    # to Ray. A scheduled row with no `admitted_at` is queued; the admission pass writes
    # its place in the queue (1 = next) and why it waits.
    need: Mapped[dict[str, Any] | None]
    admitted_at: Mapped[datetime | None]
    queue_position: Mapped[int | None] = mapped_column(Integer)
    queue_reason: Mapped[str | None] = mapped_column(Text)


class Lease(Base):
    """A named lease: the API replica that holds it (until `expires_at`, renewed while it
    lives) alone runs that loop, e.g. the reconciler and admission (services/lease.py)."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(256))
    expires_at: Mapped[datetime]


class JobLogLine(Base):
    __tablename__ = "job_log_lines"
    __table_args__ = (Index("ix_job_log_lines_job_key_id", "job_key", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_key: Mapped[str] = mapped_column(
        String(JOB_KEY_LENGTH), ForeignKey("jobs.key", ondelete="CASCADE")
    )
    logged_at: Mapped[datetime]
    line: Mapped[str] = mapped_column(Text)


class JobMetric(Base):
    """What a job measured at one step (loss, learning rate, tokens/s, validation figures),
    as data: one row per step, the figures of a step merged into it as they come."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_key", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_key: Mapped[str] = mapped_column(
        String(JOB_KEY_LENGTH), ForeignKey("jobs.key", ondelete="CASCADE")
    )
    step: Mapped[int] = mapped_column(Integer)
    # The epoch the step belongs to (0: before training); None where it is not known
    # (figures carried over from log lines by migration 0006).
    epoch: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[datetime]
    # Metric name -> a finite number.
    values: Mapped[dict[str, Any]]


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_key", "iters"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_key: Mapped[str] = mapped_column(
        String(JOB_KEY_LENGTH), ForeignKey("jobs.key", ondelete="CASCADE")
    )
    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH))
    iters: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime]


class Dataset(Base):
    __tablename__ = "datasets"

    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    columns: Mapped[dict[str, Any]]
    content_url: Mapped[str] = mapped_column(Text)
    # `metadata` is taken by SQLAlchemy's declarative base.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    request_digest: Mapped[str] = mapped_column(String(64))
    row_count: Mapped[int | None]
    created_at: Mapped[datetime]


class Agent(Base):
    __tablename__ = "agents"

    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    config: Mapped[dict[str, Any]]
    request_digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class MemoryBank(Base):
    __tablename__ = "memory_banks"

    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    # The Milvus collection that holds the bank's vectors (`corral_<hex>`, chosen here).
    collection: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime]
    # How the bank's documents are chunked and embedded (`corral.memory.types.BankSettings`),
    # and the embedding dimension of its collection (0: the collection is not made yet).
    embedding_model: Mapped[str] = mapped_column(String(256), server_default="all-minilm-l6-v2")
    chunk_tokens: Mapped[int] = mapped_column(Integer, server_default="192")
    overlap_tokens: Mapped[int] = mapped_column(Integer, server_default="48")
    dimension: Mapped[int] = mapped_column(Integer, server_default="0")


class MemoryBankDocument(Base):
    """One document of a bank, as the client sent it (content: its base64, unchanged), and
    the version whose chunks are current in the bank's collection: search hits of any
    other version are stale (an update under way, or one that crashed) and are dropped."""

    __tablename__ = "memory_bank_documents"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant", "bank_uuid"],
            ["memory_banks.tenant", "memory_banks.uuid"],
            ondelete="CASCADE",
        ),
    )

    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), primary_key=True)
    bank_uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    uuid: Mapped[str] = mapped_column(String(UUID_LENGTH), primary_key=True)
    mime_type: Mapped[str] = mapped_column(String(256))
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON)
    content: Mapped[str] = mapped_column(Text)
    # sha256 of the document's canonical JSON: the same uuid with another document is a 409.
    content_digest: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    chunk_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ServedModel(Base):
    """A model a tenant registered: a checkpoint directory (or a LoRA adapter over a
    base), its kind, and its `serve_apps.options.ReplicaOptions` as one JSON object
    (validated by that model whenever it is read or written: `corral.store.models`)."""

    __tablename__ = "served_models"

    tenant: Mapped[str] = mapped_column(String(TENANT_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    checkpoint_dir: Mapped[str] = mapped_column(Text)
    adapter_dir: Mapped[str | None] = mapped_column(Text)
    options: Mapped[dict[str, Any]]
    # The uuid (in this tenant's namespace) of the job whose checkpoint this is.
    source_job_uuid: Mapped[str | None] = mapped_column(String(UUID_LENGTH))
    # A reward model's label weights (label name -> weight); NULL for every other model.
    score_weights: Mapped[dict[str, Any] | None]
    # A LoRA adapter riding on a served base's replicas (engine vllm): the base's own
    # name, whether that is a models-file model ("file") or this tenant's ("registered"),
    # and the id its replicas know the adapter by (new for every registration). NULL
    # for a model with an app of its own.
    base_model: Mapped[str | None] = mapped_column(String(256))
    base_source: Mapped[str | None] = mapped_column(String(16))
    adapter_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class FileModelScale(Base):
    """An operator's replica bounds for a shared model from the models file: the file
    says how a model starts the first time; once scaled, these bounds win (at every
    start-up too) until the next scale. Keyed by the model's own name in the file."""

    __tablename__ = "file_model_scales"
    __table_args__ = (
        CheckConstraint("min_replicas >= 0 AND max_replicas >= min_replicas", name="replicas"),
    )

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    min_replicas: Mapped[int] = mapped_column(Integer)
    max_replicas: Mapped[int] = mapped_column(Integer)
    # The tenant of the operator key that scaled it last.
    scaled_by: Mapped[str] = mapped_column(String(TENANT_LENGTH))
    updated_at: Mapped[datetime]
