"""Memory banks hold documents: each bank keeps the settings its chunks were made with
(`memory_banks.embedding_model`, `chunk_tokens`, `overlap_tokens`, and the embedding
`dimension` of its Milvus collection), and each document is a row of
`memory_bank_documents` with its content exactly as the client sent it (base64) and the
`version` whose chunks are current in Milvus (see `corral.services.memory_banks`).

Banks stored before could hold no documents (the routes answered 501): they get the
default settings of this revision and dimension 0 (their collection is made at their
first insert, with the model's own dimension).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("memory_banks") as batch:
        batch.add_column(
            sa.Column(
                "embedding_model",
                sa.String(256),
                nullable=False,
                server_default="all-minilm-l6-v2",
            )
        )
        batch.add_column(
            sa.Column("chunk_tokens", sa.Integer(), nullable=False, server_default="192")
        )
        batch.add_column(
            sa.Column("overlap_tokens", sa.Integer(), nullable=False, server_default="48")
        )
        batch.add_column(sa.Column("dimension", sa.Integer(), nullable=False, server_default="0"))

    op.create_table(
        "memory_bank_documents",
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("bank_uuid", sa.String(128), nullable=False),
        sa.Column("uuid", sa.String(128), nullable=False),
        sa.Column("mime_type", sa.String(256), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("content_digest", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("chunk_count", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC_TIME, nullable=False),
        sa.Column("updated_at", UTC_TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant", "bank_uuid"],
            ["memory_banks.tenant", "memory_banks.uuid"],
            name=op.f("fk_memory_bank_documents_tenant_memory_banks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "tenant", "bank_uuid", "uuid", name=op.f("pk_memory_bank_documents")
        ),
    )


def downgrade() -> None:
    # Documents had nowhere to live before this revision: they go with their table.
    op.drop_table("memory_bank_documents")
    with op.batch_alter_table("memory_banks") as batch:
        batch.drop_column("dimension")
        batch.drop_column("overlap_tokens")
        batch.drop_column("chunk_tokens")
        batch.drop_column("embedding_model")
