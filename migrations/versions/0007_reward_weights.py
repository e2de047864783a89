"""A registered reward model's label weights: `served_models.score_weights`, a nullable
JSON object (label name -> weight; see `corral.serving.catalog.ModelSpec.score_weights`).
Every row stored before is an LLM, which has none: NULL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("served_models", sa.Column("score_weights", sa.JSON(), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE (SQLite drops a column itself since 3.35). Reward models stored
    # since lose their weights, as the schema before this had nowhere to keep them.
    op.drop_column("served_models", "score_weights")
