"""Admission: a job's need (`jobs.need`: Ray resource name -> amount, what it holds while
it runs), when it was let through to Ray (`jobs.admitted_at`; NULL while it is queued),
and its place in the queue with the reason it waits (`queue_position`, `queue_reason`,
written by the admission pass); and `leases`, which lets one API replica of several run
the reconciler and admission.

Every job stored before was handed to Ray when it was submitted, so each counts as
admitted at its `scheduled_at`. Unfinished ones get their need from their kind and launch
config, as jobs/resources.py reads it today (copied here: a migration must not change
when that module does); finished ones hold nothing and keep NULL.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    sa.Column("need", sa.JSON(), nullable=True),
    sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("queue_position", sa.Integer(), nullable=True),
    sa.Column("queue_reason", sa.Text(), nullable=True),
)

_jobs = sa.table(
    "jobs",
    sa.column("key", sa.String),
    sa.column("kind", sa.String),
    sa.column("status", sa.String),
    sa.column("launch", sa.JSON),
    sa.column("scheduled_at", sa.DateTime(timezone=True)),
    sa.column("need", sa.JSON),
    sa.column("admitted_at", sa.DateTime(timezone=True)),
)


def upgrade() -> None:
    # Plain ALTER TABLEs, never a batch: a batch rebuilds `jobs` on SQLite, and dropping
    # the old table would delete every log line and checkpoint through their foreign keys.
    for column in COLUMNS:
        op.add_column("jobs", column)
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_leases")),
    )
    connection = op.get_bind()
    connection.execute(_jobs.update().values(admitted_at=_jobs.c.scheduled_at))
    unfinished = connection.execute(
        sa.select(_jobs.c.key, _jobs.c.kind, _jobs.c.launch).where(
            _jobs.c.status.in_(["scheduled", "running"])
        )
    )
    for key, kind, launch in unfinished:
        need = _need(kind, launch)
        if need is not None:
            connection.execute(_jobs.update().where(_jobs.c.key == key).values(need=need))


def _need(kind: str, launch: dict[str, Any] | None) -> dict[str, float] | None:
    if kind in ("supervised_fine_tune", "preference_optimize"):
        launch = launch or {}
        workers = float(launch.get("num_workers", 2))
        return {"GPU" if launch.get("use_gpu") else "CPU": workers}
    if kind == "synthetic_data_generation":
        return {"CPU": 0.15}
    return None


def downgrade() -> None:
    # Queued jobs go back to the old rule, under which the reconciler submits every
    # scheduled row: none is lost, the queue's order is.
    op.drop_table("leases")
    for column in reversed(COLUMNS):  # SQLite drops a column itself since 3.35
        op.drop_column("jobs", column.name)
