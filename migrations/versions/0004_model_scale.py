"""Operators' replica bounds for the shared (models file) models, stored so that a
scale survives an API restart and is the same in every API process.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "file_model_scales",
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("min_replicas", sa.Integer(), nullable=False),
        sa.Column("max_replicas", sa.Integer(), nullable=False),
        sa.Column("scaled_by", sa.String(64), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "min_replicas >= 0 AND max_replicas >= min_replicas",
            name=op.f("ck_file_model_scales_replicas"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_file_model_scales")),
    )


def downgrade() -> None:
    op.drop_table("file_model_scales")
