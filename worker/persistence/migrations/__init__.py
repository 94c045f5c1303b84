"""Versioned schema migrations (Alembic), applied by ``rc-worker db upgrade``.

The worker runs Alembic on a connection it already holds, so the same code migrates SQLite
and PostgreSQL and no alembic.ini is needed. ``run`` refuses a schema that is behind.

The revision files in ``versions/`` repeat one another's Alembic header and column
declarations on purpose, as one kept group of repeated blocks (issue 13): an applied
revision is frozen history, and code shared between revisions could change it afterwards.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from worker.errors import SchemaError

_HERE = Path(__file__).parent


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_HERE))
    config.attributes["connection"] = connection
    return config


def head() -> str:
    """The newest revision this worker knows."""
    revision = ScriptDirectory.from_config(_config()).get_current_head()
    assert revision is not None, "the migrations folder has no revision"
    return revision


def current(connection: Connection) -> str | None:
    """The revision the database is at, or None for an empty database."""
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection) -> tuple[str | None, str]:
    """Migrate to the newest revision (a no-op when already there); returns (before, after)."""
    before = current(connection)
    command.upgrade(_config(connection), "head")
    return before, head()


def check_current(connection: Connection) -> None:
    """Raise SchemaError unless the database is at the newest revision."""
    at, newest = current(connection), head()
    if at is None:
        raise SchemaError("the database has no schema yet; run `rc-worker db upgrade` first")
    if at != newest:
        raise SchemaError(f"the database schema is at revision {at}, this worker needs {newest}; run `rc-worker db upgrade`")
