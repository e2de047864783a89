"""Adapters that ride on a served base model (engine vllm, `max_adapters`): a registered
LoRA adapter whose base's replicas serve it records that base (`served_models.base_model`,
the base's own name, and `base_source`, "file" for a shared models-file model or
"registered" for the tenant's own) and the id its replicas know it by (`adapter_id`, new
for every registration). Every row stored before has an app of its own: NULL in all three.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (
    sa.Column("base_model", sa.String(256), nullable=True),
    sa.Column("base_source", sa.String(16), nullable=True),
    sa.Column("adapter_id", sa.String(64), nullable=True),
)


def upgrade() -> None:
    with op.batch_alter_table("served_models") as batch:
        for column in COLUMNS:
            batch.add_column(column)


def downgrade() -> None:
    # Adapters stored since would lose their base and so become apps of their own on the
    # next start (engine vllm, which serves no merged adapter, fails there): delete them.
    op.execute(sa.text("DELETE FROM served_models WHERE base_model IS NOT NULL"))
    with op.batch_alter_table("served_models") as batch:
        for column in reversed(COLUMNS):
            batch.drop_column(column.name)
