"""Alembic's entry point: migrate on the connection the worker passes in."""

from __future__ import annotations

from alembic import context

from worker.persistence.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise SystemExit("run migrations with `rc-worker db upgrade`, which passes the connection in")

# render_as_batch: SQLite alters tables by copying them; Alembic does that when asked.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
