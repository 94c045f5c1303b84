"""A partial index on the outbox's unpublished rows, by target topic: the backlog without a scan.

The outbox keeps its published rows, so counting the backlog (the status pages' overview)
scanned every row ever staged: about 100 ms per million on PostgreSQL on 2 cores, growing
for good. The index holds only the rows not yet published. Building it reads the outbox
once and blocks outbox writes meanwhile: run `rc-worker db upgrade` before the new workers
start, as every upgrade needs.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    unpublished = sa.text("published_at IS NULL")
    op.create_index("ix_outbox_backlog", "outbox", ["topic"], postgresql_where=unpublished, sqlite_where=unpublished)


def downgrade() -> None:
    op.drop_index("ix_outbox_backlog", table_name="outbox")
