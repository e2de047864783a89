"""Per-step metrics as data: a `job_metrics` table (one row per job and step, its figures
as a JSON object) and the planned number of steps on the job (`jobs.total_steps`).

Jobs stored before this migration reported both only as log lines ("plan: N steps",
"step N loss X lr Y tokens/s Z ..."); they are carried over from those lines, so an old
job's progress still shows (their epoch is not known: NULL). The lines themselves stay.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The two line shapes the recipes wrote before metrics were data, and the names their
# figures have now.
_PLAN = re.compile(r"plan: (\d+) steps")
_STEP = re.compile(r"step (\d+) (.*)")
_NAMES = {
    "loss": "loss",
    "lr": "learning_rate",
    "tokens/s": "tokens_per_second",
    "reward_accuracy": "reward_accuracy",
    "reward_margin": "reward_margin",
}

_jobs = sa.table("jobs", sa.column("key", sa.String), sa.column("total_steps", sa.Integer))
_lines = sa.table(
    "job_log_lines",
    sa.column("id", sa.BigInteger),
    sa.column("job_key", sa.String),
    sa.column("logged_at", sa.DateTime(timezone=True)),
    sa.column("line", sa.Text),
)
_metrics = sa.table(
    "job_metrics",
    sa.column("job_key", sa.String),
    sa.column("step", sa.Integer),
    sa.column("epoch", sa.Integer),
    sa.column("recorded_at", sa.DateTime(timezone=True)),
    sa.column("values", sa.JSON),
)


def upgrade() -> None:
    op.add_column("jobs", sa.Column("total_steps", sa.Integer(), nullable=True))
    op.create_table(
        "job_metrics",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_key", sa.String(192), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("values", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_key"],
            ["jobs.key"],
            name=op.f("fk_job_metrics_job_key_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_metrics")),
        sa.UniqueConstraint("job_key", "step", name=op.f("uq_job_metrics_job_key_step")),
    )
    _carry_over_log_lines()


def _carry_over_log_lines() -> None:
    """Planned totals and step figures from the old log lines; where a step was logged
    twice (a retried attempt), its last line wins."""
    connection = op.get_bind()
    query = (
        sa.select(_lines.c.job_key, _lines.c.logged_at, _lines.c.line)
        .where(sa.or_(_lines.c.line.startswith("plan: "), _lines.c.line.startswith("step ")))
        .order_by(_lines.c.id)
    )
    totals: dict[str, int] = {}
    steps: dict[tuple[str, int], tuple[datetime, dict[str, float]]] = {}
    for key, logged_at, line in connection.execute(query):
        if plan := _PLAN.match(line):
            totals[key] = int(plan.group(1))
        elif step := _STEP.match(line):
            steps[(key, int(step.group(1)))] = (logged_at, _figures(step.group(2)))
    for key, total in totals.items():
        connection.execute(_jobs.update().where(_jobs.c.key == key).values(total_steps=total))
    rows: list[dict[str, Any]] = [
        {"job_key": key, "step": step, "epoch": None, "recorded_at": at, "values": values}
        for (key, step), (at, values) in steps.items()
    ]
    if rows:
        connection.execute(_metrics.insert(), rows)


def _figures(text: str) -> dict[str, float]:
    """The figures of a step line after its number: `loss 2.5 lr 1.000e-03 tokens/s 100`
    -> {"loss": 2.5, "learning_rate": 0.001, ...}; what is not a known name with a finite
    number is left out."""
    figures: dict[str, float] = {}
    words = text.split()
    for name, value in zip(words[::2], words[1::2], strict=False):
        try:
            number = float(value)
        except ValueError:
            continue
        if name in _NAMES and math.isfinite(number):
            figures[_NAMES[name]] = number
    return figures


def downgrade() -> None:
    op.drop_table("job_metrics")
    # A plain ALTER TABLE, not a batch: a batch rebuilds `jobs` on SQLite, and dropping the
    # old table would delete every log line and checkpoint through their foreign keys.
    # SQLite drops a column itself since 3.35.
    op.drop_column("jobs", "total_steps")
