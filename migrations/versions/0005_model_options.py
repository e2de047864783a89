"""A registered model has a kind, and its replica options live in one JSON column
(`options`, a `serve_apps.options.ReplicaOptions`) instead of a column each: every option
the models file accepts can then be stored, and a new option needs no migration.

Existing rows are LLMs; their engine, GPUs, replica bounds, target load and batch size
move into `options` (the options they had no column for take the defaults they were
served with). The replica bounds the old CHECK constraint enforced are enforced by
ReplicaOptions on every write. The way back restores the columns from `options`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The columns that move into `options`, each with the default a row that lacks it gets on
# the way back, and the CPUs per replica the server gave every registered model then.
COLUMNS: dict[str, tuple[sa.types.TypeEngine[Any], object]] = {
    "engine": (sa.String(32), "transformers"),
    "gpus_per_replica": (sa.Double(), 0.0),
    "min_replicas": (sa.Integer(), 1),
    "max_replicas": (sa.Integer(), 1),
    "target_ongoing_requests": (sa.Double(), 2.0),
    "max_batch_size": (sa.Integer(), 8),
}
CPUS_PER_REPLICA_BEFORE = 0.5
REPLICAS_CHECK = "min_replicas >= 0 AND max_replicas >= min_replicas"
KEY = ("tenant", "name")


def upgrade() -> None:
    with op.batch_alter_table("served_models") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(32), nullable=False, server_default=sa.text("'llm'"))
        )
        batch.add_column(sa.Column("options", sa.JSON(), nullable=True))
    connection = op.get_bind()
    old = sa.table("served_models", *(sa.column(c) for c in (*KEY, *COLUMNS)))
    new = sa.table("served_models", *(sa.column(c) for c in KEY), sa.column("options", sa.JSON))
    for row in connection.execute(sa.select(old)).mappings().all():
        options: dict[str, object] = {name: row[name] for name in COLUMNS}
        options["cpus_per_replica"] = CPUS_PER_REPLICA_BEFORE
        connection.execute(
            new.update()
            .where(new.c.tenant == row["tenant"], new.c.name == row["name"])
            .values(options=options)
        )
    with op.batch_alter_table("served_models", recreate="always") as batch:
        batch.alter_column("options", existing_type=sa.JSON(), nullable=False)
        batch.alter_column("kind", existing_type=sa.String(32), server_default=None)
        batch.drop_constraint(op.f("ck_served_models_replicas"), type_="check")
        for name in COLUMNS:
            batch.drop_column(name)


def downgrade() -> None:
    with op.batch_alter_table("served_models") as batch:
        for name, (type_, _default) in COLUMNS.items():
            batch.add_column(sa.Column(name, type_, nullable=True))
    connection = op.get_bind()
    stored = sa.table("served_models", *(sa.column(c) for c in KEY), sa.column("options"))
    old = sa.table("served_models", *(sa.column(c) for c in (*KEY, *COLUMNS)))
    for row in connection.execute(sa.select(stored)).mappings().all():
        options = row["options"]
        if isinstance(options, str):  # a JSON column read without its type
            options = json.loads(options)
        connection.execute(
            old.update()
            .where(old.c.tenant == row["tenant"], old.c.name == row["name"])
            .values({name: options.get(name, default) for name, (_t, default) in COLUMNS.items()})
        )
    with op.batch_alter_table("served_models", recreate="always") as batch:
        for name, (type_, _default) in COLUMNS.items():
            batch.alter_column(name, existing_type=type_, nullable=False)
        batch.create_check_constraint(op.f("ck_served_models_replicas"), REPLICAS_CHECK)
        batch.drop_column("options")
        batch.drop_column("kind")
