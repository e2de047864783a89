"""Job uuids live in each tenant's own namespace: a job is keyed by `key`, which the server
derives from (tenant, uuid) (`corral.tenancy.job_key`) and uses as its Ray submission id;
(tenant, uuid) is unique. Log lines and checkpoints refer to the key. Registered models
keep the uuid of the job they came from, without a foreign key (it is the tenant's uuid).
Cancelled jobs carry `stop_pending` until Ray confirms their Ray job is stopped.

Rows that exist already keep their uuid as their key: that is the id their Ray job and
checkpoint folder were given, so the reconciler still finds them.

SQLite rebuilds a table to change its keys; dropping a parent table with foreign keys on
deletes (or nulls) its children's rows, so every foreign key to `jobs.uuid` is dropped
before `jobs` is rebuilt and the new ones are added after.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_LENGTH = 192
CHILDREN = ("job_log_lines", "checkpoints")


def upgrade() -> None:
    _drop_job_foreign_keys("job_uuid", "uuid")
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("key", sa.String(KEY_LENGTH), nullable=True))
        batch.add_column(
            sa.Column("stop_pending", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(sa.text("UPDATE jobs SET key = uuid"))
    with op.batch_alter_table("jobs", recreate="always") as batch:
        batch.alter_column("key", existing_type=sa.String(KEY_LENGTH), nullable=False)
        batch.drop_constraint("pk_jobs", type_="primary")
        batch.create_primary_key("pk_jobs", ["key"])
        batch.create_unique_constraint("uq_jobs_tenant_uuid", ["tenant", "uuid"])
    _rename_job_column("job_uuid", "job_key", sa.String(KEY_LENGTH))
    _add_job_foreign_keys("job_key", "key")


def downgrade() -> None:
    # Only keys that are bare uuids (rows from before this revision) can go back; a
    # database with two tenants' jobs under one uuid cannot be downgraded.
    _drop_job_foreign_keys("job_key", "key")
    _rename_job_column("job_key", "job_uuid", sa.String(128))
    for table in CHILDREN:  # table names from this module, not input
        op.execute(
            sa.text(f"UPDATE {table} SET job_uuid = (SELECT uuid FROM jobs WHERE key = job_uuid)")  # noqa: S608
        )
    with op.batch_alter_table("jobs", recreate="always") as batch:
        batch.drop_constraint("uq_jobs_tenant_uuid", type_="unique")
        batch.drop_constraint("pk_jobs", type_="primary")
        batch.create_primary_key("pk_jobs", ["uuid"])
        batch.drop_column("stop_pending")
        batch.drop_column("key")
    _add_job_foreign_keys("job_uuid", "uuid")
    with op.batch_alter_table("served_models") as batch:
        batch.create_foreign_key(
            "fk_served_models_source_job_uuid_jobs",
            "jobs",
            ["source_job_uuid"],
            ["uuid"],
            ondelete="SET NULL",
        )


def _rename_job_column(old: str, new: str, type_: sa.String) -> None:
    """Rename the children's column that refers to a job, with the index and unique
    constraint named after it (created in a second step: a batch cannot refer to a
    column it renames)."""
    with op.batch_alter_table("job_log_lines") as batch:
        batch.drop_index(f"ix_job_log_lines_{old}_id")
        batch.alter_column(old, new_column_name=new, type_=type_)
    with op.batch_alter_table("checkpoints") as batch:
        batch.drop_constraint(f"uq_checkpoints_{old}_iters", type_="unique")
        batch.alter_column(old, new_column_name=new, type_=type_)
    op.create_index(f"ix_job_log_lines_{new}_id", "job_log_lines", [new, "id"])
    with op.batch_alter_table("checkpoints") as batch:
        batch.create_unique_constraint(f"uq_checkpoints_{new}_iters", [new, "iters"])


def _drop_job_foreign_keys(column: str, referred: str) -> None:
    for table in CHILDREN:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"fk_{table}_{column}_jobs", type_="foreignkey")
    if referred == "uuid":
        with op.batch_alter_table("served_models") as batch:
            batch.drop_constraint("fk_served_models_source_job_uuid_jobs", type_="foreignkey")


def _add_job_foreign_keys(column: str, referred: str) -> None:
    for table in CHILDREN:
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(
                f"fk_{table}_{column}_jobs", "jobs", [column], [referred], ondelete="CASCADE"
            )
