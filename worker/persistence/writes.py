"""The version-checked commit of a unit of work, statement by statement, inside the store's transaction.

Keys are compare-and-set (or bumped) in one global order, then records, their associations,
the processed-event markers and the outbox rows are written, and the partition's offset
advanced under its fence: one transaction, so all of it commits or none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import bindparam, case, delete, func, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from worker.errors import FencedError, VersionConflict
from worker.persistence.keys import Key, Marker
from worker.persistence.records import OutboxMessage
from worker.persistence.schema import (
    key_versions,
    outbox,
    partition_offsets,
    processed_events,
    record_associations,
    records,
)
from worker.persistence.sql import CHUNK, chunks, dialect_insert, encode_headers
from worker.persistence.unit import UnitOfWork


@dataclass(frozen=True, slots=True)
class Fence:
    """This worker's claim on a partition: commits carry it, and fail once another claims it."""

    group_id: str
    topic: str
    partition: int
    generation: int


class UnitWrites:
    """The statements of a commit, prepared once per store for its dialect."""

    def __init__(self, is_sqlite: bool) -> None:
        self.is_sqlite = is_sqlite
        self.lock_statement, self._bump_statement = self._version_statements()
        self._marker_statement = dialect_insert(is_sqlite, processed_events).on_conflict_do_nothing().returning(processed_events.c.event_id)

    async def apply(
        self, conn: AsyncConnection, unit: UnitOfWork, fence: Fence | None, next_offset: int | None, also: Sequence[tuple[Fence, int]] = ()
    ) -> dict[Key, int]:
        """Write ``unit`` on ``conn`` if nothing it read has changed; returns the new versions of the keys written.

        ``also``: more partitions (of the same topic) whose batches the unit spans, each
        advanced to its next offset under its own fence.
        """
        new_versions = await self._check_and_bump(conn, unit)
        await self._write_records(conn, unit, new_versions)
        await self._write_markers(conn, unit.markers)
        await self._write_outbox(conn, unit.outbox, fence)
        if also:
            await self.advance_many(conn, [(fence, next_offset), *also] if fence is not None and next_offset is not None else also)
        elif fence is not None:
            await self.advance(conn, fence, next_offset)
        return new_versions

    async def _check_and_bump(self, conn: AsyncConnection, unit: UnitOfWork) -> dict[Key, int]:
        """Lock every key read or written in one global order, bump those written, check those read.

        One statement whatever the keys: each row is upserted with its increment (1 if
        written, else 0), which locks it, creates an absent one, and returns its version
        after the bump; a key read is unchanged if that version, less its increment, is the
        one read. A conflict raises, and the transaction's rollback undoes the bumps. Locking
        first and bumping in a second statement cost a round trip more per unit (on SQLite
        through aiosqlite, four thread hops); one statement per run of keys of the same kind,
        before that, cost one per run.
        """
        written = unit.written
        keys = sorted(unit.seen.keys() | written)
        if not keys:
            return {}
        # executemany: SQLAlchemy sends these as multi-row statements ("insertmanyvalues")
        # compiled once and cached, instead of compiling a new VALUES list every batch. On
        # PostgreSQL the rows are taken in VALUES order: every commit locks in key order.
        rows = [{"app_id": app, "key": key, "version": int((app, key) in written)} for app, key in keys]
        result = await conn.execute(self._bump_statement, rows)
        versions = {(row.app_id, row.key): row.version for row in result}
        changed = sorted(key for key, seen in unit.seen.items() if versions[key] - (key in written) != seen)
        if changed:
            raise VersionConflict(
                f"{len(changed)} key(s) changed since read, first {changed[0][1]!r} of app {changed[0][0]!r}",
                keys=frozenset(changed),
            )
        return versions

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
        for chunk in chunks(deletes + unlink, CHUNK):
            await conn.execute(delete(record_associations).where(pair.in_(chunk)))
        for chunk in chunks(deletes, CHUNK):
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
                "source_partition": m.source_partition if m.source_partition is not None else fence.partition if fence else None,
                "topic": m.topic,
                "key": m.key,
                "value": m.value,
                "headers": encode_headers(m.headers),
                "created_at": now,
            }
            for m in messages
        ]
        if rows:
            await conn.execute(outbox.insert(), rows)

    async def advance(self, conn: AsyncConnection, fence: Fence, next_offset: int | None) -> None:
        """Move the partition's stored offset (None: keep it), or raise FencedError if ``fence`` is stale."""
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

    async def advance_many(self, conn: AsyncConnection, advances: Sequence[tuple[Fence, int]]) -> None:
        """Move several partitions' stored offsets in one statement, or raise FencedError if a fence is stale."""
        first = advances[0][0]
        result = await conn.execute(
            update(partition_offsets)
            .where(
                partition_offsets.c.group_id == first.group_id,
                partition_offsets.c.topic == first.topic,
                tuple_(partition_offsets.c.partition, partition_offsets.c.generation).in_(
                    [(f.partition, f.generation) for f, _ in advances]
                ),
            )
            .values(next_offset=case({f.partition: offset for f, offset in advances}, value=partition_offsets.c.partition))
        )
        if result.rowcount != len(advances):
            partitions = sorted(f.partition for f, _ in advances)
            raise FencedError(
                f"one of partitions {partitions} of {first.topic} was claimed by another worker (a stale generation); dropping this work"
            )

    def _version_statements(self) -> tuple[Any, Any]:
        """Two upserts of ``key_versions``: lock-and-read (the locked session's), and lock-bump-and-read (a commit's)."""
        returning = (key_versions.c.app_id, key_versions.c.key, key_versions.c.version)
        index = [key_versions.c.app_id, key_versions.c.key]
        # Lock a version row, creating it (version 0) if absent, and return its version, in
        # one statement: a no-op update takes the row lock as FOR UPDATE would, and also
        # waits for a concurrent insert of the same key instead of missing it. An absent
        # row is version 0, so "nothing there yet" is checked like any other version.
        lock = dialect_insert(self.is_sqlite, key_versions)
        lock_statement = lock.on_conflict_do_update(index_elements=index, set_={"version": key_versions.c.version}).returning(*returning)
        # Lock, create and bump in one: the inserted version is the increment (0 or 1), and
        # an existing row adds it, so a key read but not written is locked and left as it is.
        bump = dialect_insert(self.is_sqlite, key_versions)
        bump_statement = bump.on_conflict_do_update(
            index_elements=index, set_={"version": key_versions.c.version + bump.excluded.version}
        ).returning(*returning)
        return lock_statement, bump_statement
