"""Initial schema: jobs with their log lines and checkpoints, datasets, agents, memory
banks and served models; every object carries its tenant.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Migrations spell their types out rather than import the live models, so that a later
# change to the models can never rewrite history.
UTC_TIME = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _tenant() -> sa.Column[str]:
    return sa.Column("tenant", sa.String(64), nullable=False)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("uuid", sa.String(128), nullable=False),
        _tenant(),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("scheduled_at", UTC_TIME, nullable=False),
        sa.Column("started_at", UTC_TIME, nullable=True),
        sa.Column("completed_at", UTC_TIME, nullable=True),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.Column("resources_allocated", sa.JSON(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "kind IN ('supervised_fine_tune', 'preference_optimize', 'synthetic_data_generation')",
            name=op.f("ck_jobs_kind"),
        ),
        sa.CheckConstraint(
            "status IN ('scheduled', 'running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.PrimaryKeyConstraint("uuid", name=op.f("pk_jobs")),
    )
    op.create_index("ix_jobs_tenant_status", "jobs", ["tenant", "status"])

    op.create_table(
        "job_log_lines",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_uuid", sa.String(128), nullable=False),
        sa.Column("logged_at", UTC_TIME, nullable=False),
        sa.Column("line", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_uuid"],
            ["jobs.uuid"],
            name=op.f("fk_job_log_lines_job_uuid_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_log_lines")),
    )
    op.create_index("ix_job_log_lines_job_uuid_id", "job_log_lines", ["job_uuid", "id"])

    op.create_table(
        "checkpoints",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("job_uuid", sa.String(128), nullable=False),
        _tenant(),
        sa.Column("iters", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_uuid"],
            ["jobs.uuid"],
            name=op.f("fk_checkpoints_job_uuid_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("job_uuid", "iters", name=op.f("uq_checkpoints_job_uuid_iters")),
    )

    op.create_table(
        "datasets",
        _tenant(),
        sa.Column("uuid", sa.String(128), nullable=False),
        sa.Column("columns", sa.JSON(), nullable=False),
        sa.Column("content_url", sa.Text(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("row_count", sa.Integer(), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "uuid", name=op.f("pk_datasets")),
    )

    op.create_table(
        "agents",
        _tenant(),
        sa.Column("uuid", sa.String(128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "uuid", name=op.f("pk_agents")),
    )

    op.create_table(
        "memory_banks",
        _tenant(),
        sa.Column("uuid", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("collection", sa.String(256), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "uuid", name=op.f("pk_memory_banks")),
    )

    op.create_table(
        "served_models",
        _tenant(),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("checkpoint_dir", sa.Text(), nullable=False),
        sa.Column("adapter_dir", sa.Text(), nullable=True),
        sa.Column("engine", sa.String(32), nullable=False),
        sa.Column("gpus_per_replica", sa.Double(), nullable=False),
        sa.Column("min_replicas", sa.Integer(), nullable=False),
        sa.Column("max_replicas", sa.Integer(), nullable=False),
        sa.Column("target_ongoing_requests", sa.Double(), nullable=False),
        sa.Column("max_batch_size", sa.Integer(), nullable=False),
        sa.Column("source_job_uuid", sa.String(128), nullable=True),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.CheckConstraint(
            "min_replicas >= 0 AND max_replicas >= min_replicas",
            name=op.f("ck_served_models_replicas"),
        ),
        sa.ForeignKeyConstraint(
            ["source_job_uuid"],
            ["jobs.uuid"],
            name=op.f("fk_served_models_source_job_uuid_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("tenant", "name", name=op.f("pk_served_models")),
    )


def downgrade() -> None:
    op.drop_table("served_models")
    op.drop_table("memory_banks")
    op.drop_table("agents")
    op.drop_table("datasets")
    op.drop_table("checkpoints")
    op.drop_index("ix_job_log_lines_job_uuid_id", table_name="job_log_lines")
    op.drop_table("job_log_lines")
    op.drop_index("ix_jobs_tenant_status", table_name="jobs")
    op.drop_table("jobs")
