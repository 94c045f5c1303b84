"""An index on processed_events.processed_at, so retention finds the oldest markers without a scan.

Building it blocks marker writes until it is done (on PostgreSQL about a second per million
markers on 2 cores): run `rc-worker db upgrade` before the new workers start, as every
upgrade needs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

# A repeated block kept on purpose (issue 13): a migration is frozen history, so its Alembic
# header and table declarations repeat the other migrations' instead of sharing code that a
# later change could alter under an already-applied revision.
revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_processed_events_processed_at", "processed_events", ["processed_at"])


def downgrade() -> None:
    op.drop_index("ix_processed_events_processed_at", table_name="processed_events")
