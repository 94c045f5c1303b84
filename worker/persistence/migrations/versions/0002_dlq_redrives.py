"""Dead letters re-driven by `rc-worker dlq redrive`, so none is sent back twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# A repeated block kept on purpose (issue 13): a migration is frozen history, so its Alembic
# header and table declarations repeat the other migrations' instead of sharing code that a
# later change could alter under an already-applied revision.
revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dlq_redrives",
        sa.Column("dlq_topic", sa.String(250), primary_key=True),
        sa.Column("dlq_partition", sa.Integer, primary_key=True),
        sa.Column("dlq_offset", sa.BigInteger, primary_key=True),
        sa.Column("target", sa.String(250), nullable=False),
        sa.Column("redriven_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("dlq_redrives")
