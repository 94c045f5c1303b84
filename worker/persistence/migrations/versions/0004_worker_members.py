"""worker_members: each running worker says where its status endpoint is, for the status pages.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# A repeated block kept on purpose (issue 13): a migration is frozen history, so its Alembic
# header and table declarations repeat the other migrations' instead of sharing code that a
# later change could alter under an already-applied revision.
revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "worker_members",
        sa.Column("member", sa.String(250), primary_key=True),
        sa.Column("group_id", sa.String(250), nullable=False),
        sa.Column("topic", sa.String(250), nullable=False),
        sa.Column("host", sa.String(250), nullable=False),
        sa.Column("kafka_member_id", sa.String(250), nullable=True),
        sa.Column("url", sa.String(500), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_worker_members_group", "worker_members", ["group_id", "topic", "seen_at"])


def downgrade() -> None:
    op.drop_index("ix_worker_members_group", table_name="worker_members")
    op.drop_table("worker_members")
