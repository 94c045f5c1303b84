"""Records, associations, key versions, processed markers, partition offsets, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# A repeated block kept on purpose (issue 13): a migration is frozen history, so its Alembic
# header and table declarations repeat the other migrations' instead of sharing code that a
# later change could alter under an already-applied revision.
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "records",
        sa.Column("app_id", sa.String(200), primary_key=True),
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("associations", sa.Text, nullable=False),
    )
    op.create_table(
        "record_associations",
        sa.Column("app_id", sa.String(200), primary_key=True),
        sa.Column("association", sa.String(600), primary_key=True),
        sa.Column("record_id", sa.String(200), primary_key=True),
    )
    op.create_index("ix_record_associations_record", "record_associations", ["app_id", "record_id"])
    op.create_table(
        "key_versions",
        sa.Column("app_id", sa.String(200), nullable=False),
        sa.Column("key", sa.String(700), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("key", "app_id", name="key_versions_pkey"),
    )
    op.create_table(
        "processed_events",
        sa.Column("app_id", sa.String(200), nullable=False),
        sa.Column("source", sa.String(500), nullable=False),
        sa.Column("event_id", sa.String(500), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("event_id", "source", "app_id", name="processed_events_pkey"),
    )
    op.create_table(
        "partition_offsets",
        sa.Column("group_id", sa.String(250), primary_key=True),
        sa.Column("topic", sa.String(250), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("owner", sa.String(250), nullable=False),
        sa.Column("next_offset", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("app_id", sa.String(200), nullable=True),
        sa.Column("source_topic", sa.String(250), nullable=True),
        sa.Column("source_partition", sa.Integer, nullable=True),
        sa.Column("topic", sa.String(250), nullable=False),
        sa.Column("key", sa.LargeBinary, nullable=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
        sa.Column("headers", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("target_partition", sa.Integer, nullable=True),
        sa.Column("attempt_offset", sa.BigInteger, nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_outbox_unpublished", "outbox", ["source_topic", "source_partition", "published_at", "id"])


def downgrade() -> None:
    for table in ("outbox", "partition_offsets", "processed_events", "key_versions", "record_associations", "records"):
        op.drop_table(table)
