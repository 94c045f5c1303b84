"""The database behind every unit of work: reads, the version-checked commit, offsets, outbox.

This is the only module that talks SQL. SQLite (aiosqlite) runs in WAL mode and takes its
write lock at BEGIN IMMEDIATE, so writers queue instead of failing half-way; PostgreSQL
(asyncpg) runs at READ COMMITTED and relies on compare-and-set upserts of ``key_versions``
taken in one global key order, so concurrent commits block briefly or fail cleanly as a
VersionConflict, never deadlock on each other's keys. SQLAlchemy errors are translated here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import groupby
from typing import Any

import orjson
from sqlalchemy import Table, bindparam, delete, func, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError as DBAPIDataError
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from worker.config import PersistenceSettings
from worker.errors import DataError, FencedError, PersistenceError, VersionConflict
from worker.persistence import migrations
from worker.persistence.schema import (
    key_versions,
    outbox,
    partition_offsets,
    processed_events,
    record_associations,
    records,
)
from worker.persistence.unit import Key, Marker, OutboxMessage, Snapshot, StoredRecord, UnitOfWork

# PostgreSQL's codes for "try again": serialization failure, deadlock, and lock_timeout
# expired (what an optimistic commit gets instead of waiting behind a locked one).
_RETRY_SQLSTATES = {"40001", "40P01", "55P03"}
# unique_violation: another unit inserted the same row first, a conflict like any other. Every
# other integrity error (not null, check, foreign key), and every data exception (class 22:
# too long, NUL, bad encoding), is the data's fault and fails again however often it is tried.
_UNIQUE_VIOLATION = "23505"
_DATA_SQLSTATE_CLASSES = ("22", "23")
# How long an optimistic commit waits for a row lock before it counts as a conflict. Locked
# units take their keys in key order too, but may lock a key they had not foreseen later;
# giving way quickly breaks any such cycle long before deadlock detection (1 s) would.
_OPTIMISTIC_LOCK_TIMEOUT = "200ms"
# Rows per multi-row statement: far below SQLite's 32,766 bound parameters.
_CHUNK = 400


@dataclass(frozen=True, slots=True)
class Fence:
    """This worker's claim on a partition: commits carry it, and fail once another claims it."""

    group_id: str
    topic: str
    partition: int
    generation: int


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


class Store:
    """One database, shared by every worker process of the group."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time. Writers of this process queue here, in order,
        # instead of in SQLite's busy handler, which sleeps in growing steps between tries.
        self._sqlite_writer = asyncio.Lock()
        self._version_statements = self._build_version_statements()
        self._versions_statement = select(key_versions.c.key, key_versions.c.version).where(
            key_versions.c.app_id == bindparam("app_id"), key_versions.c.key.in_(bindparam("keys", expanding=True))
        )
        # Lock a version row, creating it (version 0) if absent, and return its version, in
        # one statement: a no-op update takes the row lock as FOR UPDATE would, and also
        # waits for a concurrent insert of the same key instead of missing it.
        lock = self._insert(key_versions)
        self._lock_statement = lock.on_conflict_do_update(
            index_elements=[key_versions.c.app_id, key_versions.c.key], set_={"version": key_versions.c.version}
        ).returning(key_versions.c.app_id, key_versions.c.key, key_versions.c.version)
        self._processed_statement = select(processed_events.c.event_id).where(
            processed_events.c.app_id == bindparam("app_id"),
            processed_events.c.source == bindparam("source"),
            processed_events.c.event_id.in_(bindparam("event_ids", expanding=True)),
        )
        self._marker_statement = self._insert(processed_events).on_conflict_do_nothing().returning(processed_events.c.event_id)

    @classmethod
    def from_settings(cls, settings: PersistenceSettings) -> Store:
        """Create the engine for the configured URL, with the backend's connection settings."""
        url = make_url(settings.url.get_secret_value())
        if url.get_backend_name() == "sqlite":
            engine = create_async_engine(url, echo=settings.echo, pool_size=settings.pool_size, max_overflow=0)
            _configure_sqlite(engine, settings.busy_timeout_ms)
        else:
            engine = create_async_engine(
                url, echo=settings.echo, pool_size=settings.pool_size, max_overflow=settings.pool_size, pool_pre_ping=True
            )
        return cls(engine)

    async def close(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()

    # -- schema --------------------------------------------------------------------------

    async def upgrade(self) -> tuple[str | None, str]:
        """Create or migrate the schema to the newest revision; returns (before, after)."""
        with _translate("migrating the schema"):
            async with self.engine.begin() as conn:
                return await conn.run_sync(migrations.upgrade)

    async def check_schema(self) -> None:
        """Raise SchemaError unless the schema is at the newest revision."""
        with _translate("reading the schema revision"):
            async with self.engine.connect() as conn:
                await conn.run_sync(migrations.check_current)

    # -- reads (the unit of work's Loader) -----------------------------------------------

    async def load_by_ids(self, keys: Sequence[Key], app_id: str, ids: Sequence[str]) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records with ``ids``, in one read transaction."""
        return await self._load(keys, _by_ids(app_id, ids))

    async def load_by_associations(
        self, keys: Sequence[Key], app_id: str, associations: Sequence[str]
    ) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records having all ``associations``."""
        return await self._load(keys, _by_associations(app_id, associations))

    async def processed(self, markers: Sequence[Marker]) -> set[Marker]:
        """The markers among ``markers`` that a commit has already recorded."""
        if not markers:
            return set()
        with _translate("reading processed-event markers"):
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
        with _translate("reading records"):
            async with self._read() as conn:
                # Versions first: a record changed between the two reads then shows up as a
                # conflict at commit, never as a stale read that passes the check.
                versions = await self._versions(conn, keys)
                rows = (await conn.execute(query)).all()
        return versions, [_stored(row) for row in rows]

    async def _versions(self, conn: AsyncConnection, keys: Sequence[Key], lock: bool = False) -> dict[Key, int]:
        versions: dict[Key, int] = {key: 0 for key in keys}
        if lock and not self.is_sqlite:  # SQLite's whole database is locked already
            # In key order, as every commit takes them, so lockers queue rather than deadlock.
            if keys:
                wanted = [{"app_id": app_id, "key": key, "version": 0} for app_id, key in sorted(keys)]
                versions.update({(row.app_id, row.key): row.version for row in await conn.execute(self._lock_statement, wanted)})
            return versions
        by_app: dict[str, list[str]] = {}
        for app_id, key in sorted(keys):
            by_app.setdefault(app_id, []).append(key)
        for app_id, names in by_app.items():
            rows = await conn.execute(self._versions_statement, {"app_id": app_id, "keys": names})
            versions.update({(app_id, row.key): row.version for row in rows})
        return versions

    # -- the commit ----------------------------------------------------------------------

    async def commit(self, unit: UnitOfWork, fence: Fence | None = None, next_offset: int | None = None) -> dict[Key, int]:
        """Apply ``unit`` in one transaction if nothing it read has changed.

        Raises:
            VersionConflict: a key read by the unit changed, or an event was processed meanwhile.
            FencedError: ``fence`` is no longer the partition's current claim.
            PersistenceError: the database failed.

        Returns:
            The new version of every key the unit wrote.

        """
        with _translate("committing a unit of work"):
            async with self._write() as conn:
                if not self.is_sqlite:
                    await conn.execute(text(f"SET LOCAL lock_timeout = '{_OPTIMISTIC_LOCK_TIMEOUT}'"))
                return await self._apply(conn, unit, fence, next_offset)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[LockedSession]:
        """A write transaction whose reads lock what they read: the pessimistic path.

        What the unit reads is locked until it commits (SQLite: the whole database, taken at
        BEGIN IMMEDIATE; PostgreSQL: the version rows read or passed to ``lock``), so its
        commit cannot conflict on them. Used after an optimistic attempt conflicted, so a hot
        key is taken in turn instead of by whole batches run again and again.
        """
        with _translate("running a locked unit of work"):
            async with self._write() as conn:
                yield LockedSession(self, conn)

    async def _apply(self, conn: AsyncConnection, unit: UnitOfWork, fence: Fence | None, next_offset: int | None) -> dict[Key, int]:
        new_versions = await self._check_and_bump(conn, unit)
        await self._write_records(conn, unit, new_versions)
        await self._write_markers(conn, unit.markers)
        await self._write_outbox(conn, unit.outbox, fence)
        if fence is not None:
            await self._advance(conn, fence, next_offset)
        return new_versions

    async def _check_and_bump(self, conn: AsyncConnection, unit: UnitOfWork) -> dict[Key, int]:
        """Compare-and-set every key read, bump every key written, in one global order."""

        def kind(key: Key) -> str:
            if key in unit.written:
                return "cas" if key in unit.seen else "bump"
            return "check"

        new_versions: dict[Key, int] = {}
        for which, run in groupby(sorted(unit.seen.keys() | unit.written), key=kind):
            keys = list(run)
            if which == "bump":
                rows = [{"app_id": app, "key": key, "version": 1} for app, key in keys]
            else:
                delta = 1 if which == "cas" else 0
                rows = [{"app_id": app, "key": key, "version": unit.seen[(app, key)] + delta} for app, key in keys]
            # executemany: SQLAlchemy sends these as multi-row statements ("insertmanyvalues")
            # compiled once and cached, instead of compiling a new VALUES list every batch.
            result = await conn.execute(self._version_statements[which], rows)
            returned = {(row.app_id, row.key): row.version for row in result}
            if len(returned) != len(keys):
                changed = sorted(set(keys) - returned.keys())
                raise VersionConflict(
                    f"{len(changed)} key(s) changed since read, first {changed[0][1]!r} of app {changed[0][0]!r}",
                    keys=frozenset(changed),
                )
            new_versions.update(returned)
        return new_versions

    def _build_version_statements(self) -> dict[str, Any]:
        """The three upserts of ``key_versions``, by what the unit did with the key."""
        returning = (key_versions.c.app_id, key_versions.c.key, key_versions.c.version)
        index = [key_versions.c.app_id, key_versions.c.key]
        statements: dict[str, Any] = {}
        for which, delta in (("check", 0), ("cas", 1)):
            # Insert-or-update in one statement: an absent row is version 0, so "nothing there
            # yet" is checked like any other version, and a concurrent insert fails the WHERE.
            insert = self._insert(key_versions)
            statements[which] = insert.on_conflict_do_update(
                index_elements=index,
                set_={"version": insert.excluded.version},
                where=key_versions.c.version == insert.excluded.version - delta,
            ).returning(*returning)
        # Keys written without being read (a blind create): nothing to check, only to bump,
        # so that units which did read them see the change.
        insert = self._insert(key_versions)
        statements["bump"] = insert.on_conflict_do_update(index_elements=index, set_={"version": key_versions.c.version + 1}).returning(
            *returning
        )
        return statements

    async def _write_records(self, conn: AsyncConnection, unit: UnitOfWork, new_versions: dict[Key, int]) -> None:
        inserts: list[dict[str, Any]] = []
        links: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        unlink: list[tuple[str, str]] = []
        deletes: list[tuple[str, str]] = []
        for (app_id, record_id), record in unit.staged.items():
            before = unit.base.get((app_id, record_id))
            if record is None:
                if before is not None:
                    deletes.append((app_id, record_id))
                continue
            row = {
                "app_id": app_id,
                "id": record_id,
                "data": record.data.decode(),
                "version": new_versions[(app_id, f"id:{record_id}")],
                "associations": orjson.dumps(record.associations).decode(),
            }
            if before is None:
                inserts.append(row)
            else:
                updates.append({f"b_{name}": value for name, value in row.items()})
                if before.associations == record.associations:
                    continue
                unlink.append((app_id, record_id))
            links.extend({"app_id": app_id, "association": a, "record_id": record_id} for a in record.associations)
        pair = tuple_(record_associations.c.app_id, record_associations.c.record_id)
        for chunk in _chunks(deletes + unlink, _CHUNK):
            await conn.execute(delete(record_associations).where(pair.in_(chunk)))
        for chunk in _chunks(deletes, _CHUNK):
            await conn.execute(delete(records).where(tuple_(records.c.app_id, records.c.id).in_(chunk)))
        if updates:
            await conn.execute(
                update(records)
                .where(records.c.app_id == bindparam("b_app_id"), records.c.id == bindparam("b_id"))
                .values(data=bindparam("b_data"), version=bindparam("b_version"), associations=bindparam("b_associations")),
                updates,
            )
        if inserts:
            await conn.execute(records.insert(), inserts)
        if links:
            await conn.execute(record_associations.insert(), links)

    async def _write_markers(self, conn: AsyncConnection, markers: Sequence[Marker]) -> None:
        if not markers:
            return
        now = datetime.now(UTC)
        rows = [{"app_id": a, "source": s, "event_id": e, "processed_at": now} for a, s, e in markers]
        inserted = len((await conn.execute(self._marker_statement, rows)).all())
        if inserted != len(markers):
            raise VersionConflict(f"{len(markers) - inserted} event(s) were processed by another worker meanwhile", keys=frozenset())

    async def _write_outbox(self, conn: AsyncConnection, messages: Sequence[OutboxMessage], fence: Fence | None) -> None:
        now = datetime.now(UTC)
        rows = [
            {
                "app_id": m.app_id,
                "source_topic": fence.topic if fence else None,
                "source_partition": fence.partition if fence else None,
                "topic": m.topic,
                "key": m.key,
                "value": m.value,
                "headers": _encode_headers(m.headers),
                "created_at": now,
            }
            for m in messages
        ]
        if rows:
            await conn.execute(outbox.insert(), rows)

    async def _advance(self, conn: AsyncConnection, fence: Fence, next_offset: int | None) -> None:
        result = await conn.execute(
            update(partition_offsets)
            .where(
                partition_offsets.c.group_id == fence.group_id,
                partition_offsets.c.topic == fence.topic,
                partition_offsets.c.partition == fence.partition,
                partition_offsets.c.generation == fence.generation,
            )
            .values(next_offset=func.coalesce(next_offset, partition_offsets.c.next_offset))
        )
        if result.rowcount != 1:
            raise FencedError(
                f"partition {fence.topic}[{fence.partition}] was claimed by another worker "
                f"(our generation {fence.generation} is stale); dropping this work"
            )

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
        with _translate("claiming partitions"):
            async with self._write() as conn:
                rows = (await conn.execute(statement)).all()
        return {row.partition: Claim(Fence(group_id, topic, row.partition, row.generation), row.next_offset) for row in rows}

    async def stored_offsets(self, group_id: str, topic: str) -> dict[int, int]:
        """The next offset per partition as committed with the state (for `offsets show`)."""
        with _translate("reading stored offsets"):
            async with self._read() as conn:
                rows = await conn.execute(
                    select(partition_offsets.c.partition, partition_offsets.c.next_offset).where(
                        partition_offsets.c.group_id == group_id, partition_offsets.c.topic == topic
                    )
                )
                return {row.partition: row.next_offset for row in rows if row.next_offset is not None}

    # -- outbox --------------------------------------------------------------------------

    async def pending_outbox(self, topic: str, partition: int, limit: int) -> list[PendingMessage]:
        """The oldest unpublished outbox rows staged by ``partition`` of ``topic``."""
        query = (
            select(outbox)
            .where(outbox.c.source_topic == topic, outbox.c.source_partition == partition, outbox.c.published_at.is_(None))
            .order_by(outbox.c.id)
            .limit(limit)
        )
        with _translate("reading the outbox"):
            async with self._read() as conn:
                rows = (await conn.execute(query)).all()
        return [
            PendingMessage(
                row.id,
                OutboxMessage(row.app_id, row.topic, row.key, row.value, _decode_headers(row.headers)),
                row.target_partition,
                row.attempt_offset,
            )
            for row in rows
        ]

    async def record_attempts(self, fence: Fence, attempts: Sequence[tuple[int, int, int]]) -> None:
        """Record ``(row id, target partition, its end offset now)`` before sending, if still the owner."""
        with _translate("recording outbox attempts"):
            async with self._write() as conn:
                await self._advance(conn, fence, None)
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("b_id"))
                    .values(target_partition=bindparam("b_partition"), attempt_offset=bindparam("b_offset")),
                    [{"b_id": i, "b_partition": p, "b_offset": o} for i, p, o in attempts],
                )

    async def mark_published(self, ids: Sequence[int]) -> None:
        """Record that these outbox rows reached Kafka."""
        now = datetime.now(UTC)
        with _translate("marking outbox rows published"):
            async with self._write() as conn:
                for chunk in _chunks(ids, _CHUNK):
                    await conn.execute(update(outbox).where(outbox.c.id.in_(chunk)).values(published_at=now))

    async def outbox_backlog(self) -> int:
        """How many outbox rows wait to be published (all partitions)."""
        with _translate("counting the outbox backlog"):
            async with self._read() as conn:
                count = await conn.scalar(select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None)))
        return int(count or 0)

    # -- inspection (rc-worker state) ----------------------------------------------------

    async def outbox_messages(self) -> list[tuple[int, OutboxMessage]]:
        """Every outbox row, published or not, as (row id, message), oldest first (worker.testing reads it)."""
        with _translate("reading the outbox"):
            async with self._read() as conn:
                rows = (await conn.execute(select(outbox).order_by(outbox.c.id))).all()
        return [(row.id, OutboxMessage(row.app_id, row.topic, row.key, row.value, _decode_headers(row.headers))) for row in rows]

    async def app_records(self, app_id: str, association: str | None = None) -> list[StoredRecord]:
        """Every record of ``app_id`` (with ``association``, if given), ordered by id."""
        if association is not None:
            return (await self.load_by_associations([], app_id, [association]))[1]
        query = select(records).where(records.c.app_id == app_id).order_by(records.c.id)
        return (await self._load([], query))[1]

    async def processed_count(self, app_id: str) -> int:
        """How many events ``app_id`` has processed (for tests and summaries)."""
        with _translate("counting processed events"):
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
        with _translate("pruning processed-event markers"):
            async with self._write() as conn:
                return int((await conn.execute(delete(processed_events).where(tuple_(*key).in_(oldest)))).rowcount)

    # -- internals -----------------------------------------------------------------------

    def _insert(self, table: Table) -> Any:
        # Both dialects' inserts have on_conflict_do_update/nothing with the same arguments.
        return sqlite.insert(table) if self.is_sqlite else postgresql.insert(table)

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            yield conn
            await conn.rollback()

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        async with self._sqlite_writer if self.is_sqlite else contextlib.nullcontext(), self.engine.connect() as conn:
            await conn.execution_options(rc_write=True)
            async with conn.begin():
                yield conn


class LockedSession:
    """The Loader of a unit of work run inside :meth:`Store.session`; reads lock what they see."""

    def __init__(self, store: Store, conn: AsyncConnection) -> None:
        self._store = store
        self._conn = conn
        # Versions of the keys locked so far: they cannot change until this session ends.
        self._locked: dict[Key, int] = {}

    # These run inside handlers, which may catch anything: translate here, at the call, so a
    # deadlock reaches the dispatcher as a VersionConflict, never as a handler's own error.

    async def load_by_ids(self, keys: Sequence[Key], app_id: str, ids: Sequence[str]) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys`` (locked), then the records with ``ids``."""
        return await self._load(keys, _by_ids(app_id, ids))

    async def load_by_associations(
        self, keys: Sequence[Key], app_id: str, associations: Sequence[str]
    ) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys`` (locked), then the records having all ``associations``."""
        return await self._load(keys, _by_associations(app_id, associations))

    async def lock(self, keys: Iterable[Key]) -> dict[Key, int]:
        """Lock ``keys`` (absent ones as version 0) until the session ends; returns their versions."""
        with _translate("locking version keys"):
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
        with _translate("reading records (locked)"):
            versions = await self.lock(keys)
            rows = (await self._conn.execute(query)).all()
        return {key: versions[key] for key in keys}, [_stored(row) for row in rows]

    async def processed(self, markers: Sequence[Marker]) -> set[Marker]:
        """The markers among ``markers`` already recorded."""
        with _translate("reading processed-event markers (locked)"):
            return await self._store._processed_on(self._conn, markers) if markers else set()

    async def commit(self, unit: UnitOfWork, fence: Fence | None = None, next_offset: int | None = None) -> dict[Key, int]:
        """Apply ``unit``; the transaction commits when the session's block ends."""
        return await self._store._apply(self._conn, unit, fence, next_offset)


def _by_ids(app_id: str, ids: Sequence[str]) -> Any:
    return select(records).where(records.c.app_id == app_id, records.c.id.in_(ids))


def _by_associations(app_id: str, associations: Sequence[str]) -> Any:
    having_all = (
        select(record_associations.c.record_id)
        .where(record_associations.c.app_id == app_id, record_associations.c.association.in_(associations))
        .group_by(record_associations.c.record_id)
        .having(func.count() == len(set(associations)))
    )
    return select(records).where(records.c.app_id == app_id, records.c.id.in_(having_all)).order_by(records.c.id)


def _configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    """WAL for concurrent readers; BEGIN IMMEDIATE so a writer waits for the lock up front."""
    from sqlalchemy import event

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves: the driver's own deferred BEGIN would take the write
        # lock only at the first write, where a busy database fails instead of waiting.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rc_write") else "BEGIN")


@contextlib.contextmanager
def _translate(action: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors into the worker's own, chained."""
    try:
        yield
    except DBAPIError as exc:
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code in _RETRY_SQLSTATES:
            raise VersionConflict(f"{action}: concurrent change (SQLSTATE {code})", keys=frozenset()) from exc
        if _refuses_data(exc, code):
            raise DataError(f"{action}: the database refused a value: {exc.orig}") from exc
        if isinstance(exc, IntegrityError):
            raise VersionConflict(f"{action}: concurrent change ({type(exc.orig).__name__})") from exc
        raise PersistenceError(f"{action} failed: {exc.orig}") from exc
    except UnicodeError as exc:  # sqlite3 binds str itself, and refuses a lone surrogate so
        raise DataError(f"{action}: the database refused a value: {exc}") from exc
    except (OSError, TimeoutError) as exc:  # the driver could not reach the server at all
        raise PersistenceError(f"{action} failed: {type(exc).__name__}: {exc}") from exc
    # Other SQLAlchemyErrors are bugs in the statements above: they propagate unchanged.


def _refuses_data(exc: DBAPIError, code: str | None) -> bool:
    """Whether the database refused the data itself: the same statement would fail again."""
    if code is not None:
        return code.startswith(_DATA_SQLSTATE_CLASSES) and code != _UNIQUE_VIOLATION
    # sqlite3 has no SQLSTATE: its DataError ("string or blob too big") and any integrity
    # error but a uniqueness one (a concurrent insert) are the data's.
    if isinstance(exc, DBAPIDataError):
        return True
    return isinstance(exc, IntegrityError) and "UNIQUE constraint failed" not in str(exc.orig)


def _stored(row: Any) -> StoredRecord:
    return StoredRecord(row.id, row.data.encode(), row.version, tuple(orjson.loads(row.associations)))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    return orjson.dumps([[name, base64.b64encode(value).decode()] for name, value in headers]).decode()


def _decode_headers(text: str) -> tuple[tuple[str, bytes], ...]:
    return tuple((name, base64.b64decode(value)) for name, value in orjson.loads(text))


__all__ = ["Claim", "Fence", "LockedSession", "PendingMessage", "Store"]
