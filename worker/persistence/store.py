"""The database behind every unit of work: reads, the version-checked commit, offsets, outbox.

This is the only module that talks SQL. SQLite (aiosqlite) runs in WAL mode and takes its
write lock at BEGIN IMMEDIATE, so writers queue instead of failing half-way; PostgreSQL
(asyncpg) runs at READ COMMITTED and relies on compare-and-set upserts of ``key_versions``
taken in one global key order, so concurrent commits block briefly or fail cleanly as a
VersionConflict, never deadlock on each other's keys. SQLAlchemy errors are translated here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, select, text, tuple_, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from worker.config import PersistenceSettings
from worker.persistence import migrations
from worker.persistence.keys import Key, Marker
from worker.persistence.records import OutboxMessage, StoredRecord
from worker.persistence.schema import (
    key_versions,
    outbox,
    partition_offsets,
    processed_events,
    records,
)
from worker.persistence.snapshot import Snapshot
from worker.persistence.sql import (
    CHUNK,
    OPTIMISTIC_LOCK_TIMEOUT,
    by_any_association,
    by_associations,
    by_ids,
    chunks,
    configure_sqlite,
    count_round_trips,
    decode_headers,
    dialect_insert,
    stored,
    translate,
)
from worker.persistence.unit import UnitOfWork
from worker.persistence.writes import Fence, UnitWrites


@dataclass(frozen=True, slots=True)
class Claim:
    """The result of claiming a partition: the fence, and the offset stored with the state."""

    fence: Fence
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """An outbox row waiting to be published; attempted if ``attempt_offset`` is set."""

    id: int
    message: OutboxMessage
    target_partition: int | None = None
    attempt_offset: int | None = None
    source_partition: int | None = None  # the partition whose event staged it


class _Loads:
    """The unit of work's Loader reads, for the store (a read transaction) and a locked session (locking)."""

    async def _load(self, keys: Sequence[Key], query: Any) -> tuple[dict[Key, int], list[StoredRecord]]:
        raise NotImplementedError

    async def load_by_ids(self, keys: Sequence[Key], app_id: str, ids: Sequence[str]) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records with ``ids``."""
        return await self._load(keys, by_ids(app_id, ids))

    async def load_by_associations(
        self, keys: Sequence[Key], app_id: str, associations: Sequence[str]
    ) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records having all ``associations``."""
        return await self._load(keys, by_associations(app_id, associations))

    async def load_by_any_association(
        self, keys: Sequence[Key], app_id: str, associations: Sequence[str]
    ) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records having at least one of ``associations``."""
        return await self._load(keys, by_any_association(app_id, associations))


# sqlite3 keeps this many prepared statements per connection (its default is 128). An
# expanding IN compiles to one statement per list length, so a long run fills a large cache
# with statements used once, each holding native memory: RSS grew by 150 MB over 400,000
# events with 128, and stays flat with this.
SQLITE_CACHED_STATEMENTS = 16


class Store(_Loads):
    """One database, shared by every worker process of the group."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time. Writers of this process queue here, in order,
        # instead of in SQLite's busy handler, which sleeps in growing steps between tries.
        self._sqlite_writer = asyncio.Lock()
        self._writes = UnitWrites(self.is_sqlite)
        self._versions_statement = select(key_versions.c.key, key_versions.c.version).where(
            key_versions.c.app_id == bindparam("app_id"), key_versions.c.key.in_(bindparam("keys", expanding=True))
        )
        self._processed_statement = select(processed_events.c.event_id).where(
            processed_events.c.app_id == bindparam("app_id"),
            processed_events.c.source == bindparam("source"),
            processed_events.c.event_id.in_(bindparam("event_ids", expanding=True)),
        )

    @classmethod
    def from_settings(cls, settings: PersistenceSettings) -> Store:
        """Create the engine for the configured URL, with the backend's connection settings."""
        url = make_url(settings.url.get_secret_value())
        if url.get_backend_name() == "sqlite":
            engine = create_async_engine(
                url,
                echo=settings.echo,
                pool_size=settings.pool_size,
                max_overflow=0,
                connect_args={"cached_statements": SQLITE_CACHED_STATEMENTS},
            )
            configure_sqlite(engine, settings.busy_timeout_ms)
        else:
            engine = create_async_engine(
                url, echo=settings.echo, pool_size=settings.pool_size, max_overflow=settings.pool_size, pool_pre_ping=True
            )
        return cls(engine)

    def count_round_trips(self, count: Callable[[int], None]) -> None:
        """Report each statement, BEGIN, COMMIT and ROLLBACK sent to the database to ``count``."""
        count_round_trips(self.engine, count)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    # -- schema --------------------------------------------------------------------------

    async def upgrade(self) -> tuple[str | None, str]:
        """Create or migrate the schema to the newest revision; returns (before, after)."""
        # A write transaction from its start (SQLite: BEGIN IMMEDIATE, behind the writer lock):
        # a deferred one that reads the revision first cannot take the write lock while
        # another connection holds it, and fails at once with "database is locked".
        with translate("migrating the schema"):
            async with self.transaction() as conn:
                return await conn.run_sync(migrations.upgrade)

    async def check_schema(self) -> None:
        """Raise SchemaError unless the schema is at the newest revision."""
        with translate("reading the schema revision"):
            async with self.engine.connect() as conn:
                await conn.run_sync(migrations.check_current)

    # -- reads (the unit of work's Loader) -----------------------------------------------

    async def processed(self, markers: Sequence[Marker]) -> set[Marker]:
        """The markers among ``markers`` that a commit has already recorded."""
        if not markers:
            return set()
        with translate("reading processed-event markers"):
            async with self._read() as conn:
                return await self._processed_on(conn, markers)

    async def _processed_on(self, conn: AsyncConnection, markers: Sequence[Marker]) -> set[Marker]:
        # One query per (app, source), with the event ids as an IN list: a range scan of the
        # primary key. A row-value IN of (app, source, id) tuples was planned as a scan of
        # the whole table on PostgreSQL, 70 ms a batch and growing with it.
        by_origin: dict[tuple[str, str], list[str]] = {}
        for app_id, source, event_id in markers:
            by_origin.setdefault((app_id, source), []).append(event_id)
        found: set[Marker] = set()
        for (app_id, source), event_ids in by_origin.items():
            rows = await conn.execute(self._processed_statement, {"app_id": app_id, "source": source, "event_ids": event_ids})
            found.update((app_id, source, row.event_id) for row in rows)
        return found

    async def _load(self, keys: Sequence[Key], query: Any) -> tuple[dict[Key, int], list[StoredRecord]]:
        with translate("reading records"):
            async with self._read() as conn:
                # Versions first: a record changed between the two reads then shows up as a
                # conflict at commit, never as a stale read that passes the check.
                versions = await self._versions(conn, keys)
                rows = (await conn.execute(query)).all()
        return versions, [stored(row) for row in rows]

    async def _versions(self, conn: AsyncConnection, keys: Sequence[Key], lock: bool = False) -> dict[Key, int]:
        versions: dict[Key, int] = {key: 0 for key in keys}
        if lock and not self.is_sqlite:  # SQLite's whole database is locked already
            # In key order, as every commit takes them, so lockers queue rather than deadlock.
            if keys:
                wanted = [{"app_id": app_id, "key": key, "version": 0} for app_id, key in sorted(keys)]
                versions.update({(row.app_id, row.key): row.version for row in await conn.execute(self._writes.lock_statement, wanted)})
            return versions
        by_app: dict[str, list[str]] = {}
        for app_id, key in sorted(keys):
            by_app.setdefault(app_id, []).append(key)
        for app_id, names in by_app.items():
            rows = await conn.execute(self._versions_statement, {"app_id": app_id, "keys": names})
            versions.update({(app_id, row.key): row.version for row in rows})
        return versions

    # -- the commit ----------------------------------------------------------------------

    async def commit(
        self, unit: UnitOfWork, fence: Fence | None = None, next_offset: int | None = None, also: Sequence[tuple[Fence, int]] = ()
    ) -> dict[Key, int]:
        """Apply ``unit`` in one transaction if nothing it read has changed (``also``: see UnitWrites.apply).

        Raises:
            VersionConflict: a key read by the unit changed, or an event was processed meanwhile.
            FencedError: ``fence`` is no longer the partition's current claim.
            PersistenceError: the database failed.

        Returns:
            The new version of every key the unit wrote.

        """
        with translate("committing a unit of work"):
            async with self.transaction() as conn:
                if not self.is_sqlite:
                    await conn.execute(text(f"SET LOCAL lock_timeout = '{OPTIMISTIC_LOCK_TIMEOUT}'"))
                return await self._writes.apply(conn, unit, fence, next_offset, also)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[LockedSession]:
        """A write transaction whose reads lock what they read: the pessimistic path.

        What the unit reads is locked until it commits (SQLite: the whole database, taken at
        BEGIN IMMEDIATE; PostgreSQL: the version rows read or passed to ``lock``), so its
        commit cannot conflict on them. Used after an optimistic attempt conflicted, so a hot
        key is taken in turn instead of by whole batches run again and again.
        """
        with translate("running a locked unit of work"):
            async with self.transaction() as conn:
                yield LockedSession(self, conn)

    # -- partitions ----------------------------------------------------------------------

    async def claim(self, group_id: str, topic: str, partitions: Sequence[int], owner: str) -> dict[int, Claim]:
        """Take over ``partitions``: bump their generation (fencing the old owner), read their offsets."""
        if not partitions:
            return {}
        statement = self._insert(partition_offsets).values(
            [{"group_id": group_id, "topic": topic, "partition": p, "generation": 1, "owner": owner} for p in sorted(partitions)]
        )
        statement = statement.on_conflict_do_update(
            index_elements=[partition_offsets.c.group_id, partition_offsets.c.topic, partition_offsets.c.partition],
            set_={"generation": partition_offsets.c.generation + 1, "owner": statement.excluded.owner},
        ).returning(partition_offsets.c.partition, partition_offsets.c.generation, partition_offsets.c.next_offset)
        with translate("claiming partitions"):
            async with self.transaction() as conn:
                rows = (await conn.execute(statement)).all()
        return {row.partition: Claim(Fence(group_id, topic, row.partition, row.generation), row.next_offset) for row in rows}

    async def stored_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        """The next offset per partition as committed with the state (for `offsets show`)."""
        with translate("reading stored offsets"):
            async with self._read() as conn:
                rows = await conn.execute(
                    select(partition_offsets.c.partition, partition_offsets.c.next_offset).where(
                        partition_offsets.c.group_id == group_id, partition_offsets.c.topic == topic
                    )
                )
                return {row.partition: row.next_offset for row in rows if row.next_offset is not None}

    # -- outbox --------------------------------------------------------------------------

    async def pending_outbox(self, topic: str, partition: int | Sequence[int], limit: int) -> list[PendingMessage]:
        """The oldest unpublished outbox rows staged by ``partition`` (or partitions) of ``topic``."""
        partitions = [partition] if isinstance(partition, int) else list(partition)
        query = (
            select(outbox)
            .where(outbox.c.source_topic == topic, outbox.c.source_partition.in_(partitions), outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with translate("reading the outbox"):
            async with self._read() as conn:
                rows = (await conn.execute(query)).all()
        return [
            PendingMessage(
                row.id,
                OutboxMessage(row.app_id, row.topic, row.key, row.value, decode_headers(row.headers)),
                row.target_partition,
                row.attempt_offset,
                row.source_partition,
            )
            for row in rows
        ]

    async def record_attempts(self, fence: Fence | Sequence[Fence], attempts: Sequence[tuple[int, int, int]]) -> None:
        """Record ``(row id, target partition, its end offset now)`` before sending, if still the owner (of every partition)."""
        with translate("recording outbox attempts"):
            async with self.transaction() as conn:
                for owned in [fence] if isinstance(fence, Fence) else fence:
                    await self._writes.advance(conn, owned, None)
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("b_id"))
                    .values(target_partition=bindparam("b_partition"), attempt_offset=bindparam("b_offset")),
                    [{"b_id": i, "b_partition": p, "b_offset": o} for i, p, o in attempts],
                )

    async def mark_published(self, ids: Sequence[int]) -> None:
        """Record that these outbox rows reached Kafka."""
        now = datetime.now(UTC)
        with translate("marking outbox rows published"):
            async with self.transaction() as conn:
                for chunk in chunks(ids, CHUNK):
                    await conn.execute(update(outbox).where(outbox.c.id.in_(chunk)).values(published_at=now))

    async def outbox_backlog(self) -> int:
        """How many outbox rows wait to be published (all partitions)."""
        with translate("counting the outbox backlog"):
            async with self._read() as conn:
                count = await conn.scalar(select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None)))
        return int(count or 0)

    # -- inspection (rc-worker state) ----------------------------------------------------

    async def outbox_messages(self) -> list[tuple[int, OutboxMessage]]:
        """Every outbox row, published or not, as (row id, message), oldest first (worker.testing reads it)."""
        with translate("reading the outbox"):
            async with self._read() as conn:
                rows = (await conn.execute(select(outbox).order_by(outbox.c.id))).all()
        return [(row.id, OutboxMessage(row.app_id, row.topic, row.key, row.value, decode_headers(row.headers))) for row in rows]

    async def app_records(self, app_id: str, association: str | None = None) -> list[StoredRecord]:
        """Every record of ``app_id`` (with ``association``, if given), ordered by id."""
        if association is not None:
            return (await self.load_by_associations([], app_id, [association]))[1]
        query = select(records).where(records.c.app_id == app_id).order_by(records.c.id)
        return (await self._load([], query))[1]

    async def processed_count(self, app_id: str) -> int:
        """How many events ``app_id`` has processed (for tests and summaries)."""
        with translate("counting processed events"):
            async with self._read() as conn:
                count = await conn.scalar(select(func.count()).select_from(processed_events).where(processed_events.c.app_id == app_id))
        return int(count or 0)

    async def delete_processed_before(self, cutoff: datetime, limit: int) -> int:
        """Delete at most ``limit`` processed-event markers older than ``cutoff``, in one transaction; returns how many."""
        key = (processed_events.c.event_id, processed_events.c.source, processed_events.c.app_id)
        oldest = select(*key).where(processed_events.c.processed_at < cutoff).limit(limit)
        if not self.is_sqlite:
            # Workers prune concurrently: each takes rows no other pruner holds, instead of
            # waiting on their locks only to find them gone.
            oldest = oldest.with_for_update(skip_locked=True)
        with translate("pruning processed-event markers"):
            async with self.transaction() as conn:
                return int((await conn.execute(delete(processed_events).where(tuple_(*key).in_(oldest)))).rowcount)

    # -- internals -----------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        return dialect_insert(self.is_sqlite, table)

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            if not self.is_sqlite:
                # No BEGIN and ROLLBACK around a read: two round trips fewer, and the same
                # view, as READ COMMITTED gives each statement a fresh snapshot anyway.
                await conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn
            await conn.rollback()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, behind this process's SQLite writer lock; commits when the block ends.

        For admin code (offsets, redrives) that writes tables of its own: it never copies the
        store's locking or transaction handling. Errors are not translated; wrap the block in
        :func:`~worker.persistence.sql.translate`.
        """
        async with self._sqlite_writer if self.is_sqlite else contextlib.nullcontext(), self.engine.connect() as conn:
            await conn.execution_options(rc_write=True)
            async with conn.begin():
                yield conn


class LockedSession(_Loads):
    """The Loader of a unit of work run inside :meth:`Store.session`; reads lock what they see."""

    def __init__(self, store: Store, conn: AsyncConnection) -> None:
        self._store = store
        self._conn = conn
        # Versions of the keys locked so far: they cannot change until this session ends.
        self._locked: dict[Key, int] = {}

    # These run inside handlers, which may catch anything: translate here, at the call, so a
    # deadlock reaches the dispatcher as a VersionConflict, never as a handler's own error.

    async def lock(self, keys: Iterable[Key]) -> dict[Key, int]:
        """Lock ``keys`` (absent ones as version 0) until the session ends; returns their versions."""
        with translate("locking version keys"):
            wanted = [key for key in keys if key not in self._locked]
            self._locked.update(await self._store._versions(self._conn, wanted, lock=True))
        return self._locked

    async def revalidate(self, unit: UnitOfWork, snapshot: Snapshot) -> bool:
        """Lock what ``unit`` read and wrote; True if nothing it read has changed since.

        Otherwise ``snapshot`` learns what the unit read, less what changed, so that running
        the unit's work again in this session reads from the database only what changed, and
        finds the rest locked (in key order, before any other lock: lockers queue, never
        deadlock, as long as the second run reads what the first one did).
        """
        current = await self.lock(unit.seen.keys() | unit.written)
        changed = {key for key, version in unit.seen.items() if current[key] != version}
        if changed:
            snapshot.learn(unit)
            snapshot.forget(changed)
        return not changed

    async def _load(self, keys: Sequence[Key], query: Any) -> tuple[dict[Key, int], list[StoredRecord]]:
        # Keys locked already cannot have changed: only the records are read again.
        with translate("reading records (locked)"):
            versions = await self.lock(keys)
            rows = (await self._conn.execute(query)).all()
        return {key: versions[key] for key in keys}, [stored(row) for row in rows]

    async def processed(self, markers: Sequence[Marker]) -> set[Marker]:
        """The markers among ``markers`` already recorded."""
        with translate("reading processed-event markers (locked)"):
            return await self._store._processed_on(self._conn, markers) if markers else set()

    async def commit(
        self, unit: UnitOfWork, fence: Fence | None = None, next_offset: int | None = None, also: Sequence[tuple[Fence, int]] = ()
    ) -> dict[Key, int]:
        """Apply ``unit``; the transaction commits when the session's block ends."""
        return await self._store._writes.apply(self._conn, unit, fence, next_offset, also)


__all__ = ["Claim", "Fence", "LockedSession", "PendingMessage", "Store"]
