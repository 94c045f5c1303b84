"""The schema's migrations: `rc-worker db upgrade` is idempotent, matches schema.py, and is required by the other commands."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from tests.support import ROOT, rc_worker
from worker.config import PersistenceSettings
from worker.errors import SchemaError
from worker.persistence import migrations
from worker.persistence.schema import metadata
from worker.persistence.store import Store

MIGRATIONS = Path(migrations.__file__).parent


def _env(url: str) -> dict[str, str]:
    import os

    # A topic and group nobody uses: `run` must stop before it ever reaches Kafka.
    name = f"t-migrations-{uuid.uuid4().hex[:8]}"
    return {
        **os.environ,
        "RC_WORKER_CONFIG": str(ROOT / "config.yaml"),
        "RC_WORKER_PERSISTENCE__URL": url,
        "RC_WORKER_KAFKA__TOPIC": name,
        "RC_WORKER_KAFKA__GROUP_ID": f"g-{name}",
        "RC_WORKER_LOGGING__FORMAT": "json",
    }


def _store(url: str) -> Store:
    return Store.from_settings(PersistenceSettings(url=url))  # type: ignore[arg-type]


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return [r.revision for r in reversed(list(ScriptDirectory.from_config(config).walk_revisions()))]


def _upgrade_to(connection: Connection, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _tables(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    return {
        name: ([c["name"] for c in inspector.get_columns(name)], sorted(i["name"] or "" for i in inspector.get_indexes(name)))
        for name in sorted(inspector.get_table_names())
    }


class TestUpgrade:
    async def test_db_upgrade_twice_changes_nothing_the_second_time(self, database_url: str) -> None:
        """The first `rc-worker db upgrade` creates the schema at head; the second says it is current and keeps tables and data."""
        env = _env(database_url)
        head = migrations.head()
        first = rc_worker("db", "upgrade", env=env)
        assert head in first.stdout
        assert "already current" not in first.stdout
        store = _store(database_url)
        try:
            await store.check_schema()
            fence = (await store.claim("g", "t", [0], "w"))[0].fence
            async with store.engine.connect() as conn:
                before = await conn.run_sync(_tables)
            second = rc_worker("db", "upgrade", env=env)
            assert head in second.stdout
            assert "already current" in second.stdout
            async with store.engine.connect() as conn:
                assert await conn.run_sync(_tables) == before
            assert (await store.claim("g", "t", [0], "w"))[0].fence.generation == fence.generation + 1
        finally:
            await store.close()

    async def test_db_upgrade_brings_a_schema_that_is_behind_to_head(self, database_url: str) -> None:
        """A database migrated to the first revision only is refused by the worker, then upgraded to head by the command."""
        first, *_, head = _revisions()
        assert first != head, "only one revision: nothing can be behind"
        store = _store(database_url)
        try:
            async with store.engine.begin() as conn:
                await conn.run_sync(_upgrade_to, first)
            with pytest.raises(SchemaError, match=rf"revision {first}.*needs {head}.*rc-worker db upgrade"):
                await store.check_schema()
            result = rc_worker("db", "upgrade", env=_env(database_url))
            assert f"was {first}" in result.stdout
            await store.check_schema()
        finally:
            await store.close()

    async def test_migrated_schema_matches_the_schema_module(self, store: Store) -> None:
        """Alembic's autogenerate finds no difference between the migrated database and worker/persistence/schema.py."""

        def differences(connection: Connection) -> list[Any]:
            return list(compare_metadata(MigrationContext.configure(connection), metadata))

        async with store.engine.connect() as conn:
            assert await conn.run_sync(differences) == []


class TestSchemaRequired:
    @pytest.mark.parametrize(
        "args",
        [
            ("run",),
            ("state", "get", "--app", "message-count", "--association", "misc:message-count"),
            ("state", "dump", "--app", "message-count"),
        ],
        ids=["run", "state-get", "state-dump"],
    )
    def test_commands_refuse_a_database_without_schema(self, sqlite_url: str, args: tuple[str, ...]) -> None:
        """`run` and `state` on an empty database exit 1 with a SchemaError that says to run `rc-worker db upgrade`."""
        # One backend suffices here: the check is the same code on both (tested below on each).
        result = rc_worker(*args, env=_env(sqlite_url), check=False, timeout=60)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "rc-worker db upgrade" in result.stderr
        assert "no schema" in result.stderr

    async def test_check_schema_raises_schema_error_on_an_empty_database(self, database_url: str) -> None:
        """Store.check_schema raises SchemaError (not retriable) naming the command that fixes it."""
        store = _store(database_url)
        try:
            with pytest.raises(SchemaError, match="rc-worker db upgrade") as caught:
                await store.check_schema()
            assert caught.value.retriable is False
        finally:
            await store.close()
