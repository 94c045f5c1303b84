"""Operators' bookkeeping beside the state: schema checks, stored offsets, re-driven dead letters.

Used by the data tools (``rc-worker replay``, ``offsets``, ``dlq``), never by the worker's
loop, so the store keeps only what processing needs. Same rules as ``store.py``: SQLAlchemy
errors are translated, and every write is one ``Store.transaction()``, behind the store's own writer lock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Row, select, tuple_, update

from worker.errors import PersistenceError
from worker.persistence import migrations
from worker.persistence.schema import dlq_redrives, partition_offsets
from worker.persistence.sql import chunks, dialect_insert, translate
from worker.persistence.store import Store

DlqPosition = tuple[int, int]  # (partition, offset) in the dead-letter topic
# How often a fresh database is tried for migration while another process migrates it.
PREPARE_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class Redrive:
    """One dead letter as the redrive ledger has it."""

    target: str
    redriven_at: datetime
    sent_at: datetime | None


async def schema_revision(store: Store) -> str | None:
    """The revision the database is at; None for a database without the worker's schema."""
    with translate("reading the schema revision"):
        async with store.engine.connect() as conn:
            revision: str | None = await conn.run_sync(migrations.current)
    return revision


async def prepare(store: Store) -> None:
    """Migrate a fresh database; otherwise require the current schema (never upgrade a live one behind the operator's back)."""
    for attempt in range(1, PREPARE_ATTEMPTS + 1):
        if await schema_revision(store) is not None:
            await store.check_schema()
            return
        try:
            await store.upgrade()
            return
        except PersistenceError:
            # Several replay processes may find the database fresh at once: one migrates it,
            # the others fail on its lock or its tables, and find the schema once it commits.
            if attempt == PREPARE_ATTEMPTS:
                raise
            await asyncio.sleep(0.5)


async def set_stored_offsets(
    store: Store, group_id: str, topic: str, offsets: Mapping[int, int], on_each: Callable[[], None] | None = None
) -> list[int]:
    """Overwrite the next offset kept with the state, where the group has one; returns those partitions.

    ``on_each`` is called after each partition's update (a progress display), in the one transaction.
    """
    changed = []
    with translate("setting stored offsets"):
        async with store.transaction() as conn:
            for partition, offset in sorted(offsets.items()):
                result = await conn.execute(
                    update(partition_offsets)
                    .where(
                        partition_offsets.c.group_id == group_id,
                        partition_offsets.c.topic == topic,
                        partition_offsets.c.partition == partition,
                        partition_offsets.c.next_offset.is_not(None),
                    )
                    .values(next_offset=offset)
                )
                if result.rowcount:
                    changed.append(partition)
                if on_each is not None:
                    on_each()
    return changed


async def redrives(store: Store, dlq_topic: str, positions: Sequence[DlqPosition] | None = None) -> dict[DlqPosition, Redrive]:
    """Every dead letter of ``dlq_topic`` that was re-driven (or claimed for it); with ``positions``, only those.

    The ledger only grows: a page of dead letters asks for its own ``positions`` (primary-key
    lookups), so its cost does not grow with the ledger.
    """
    query = select(dlq_redrives).where(dlq_redrives.c.dlq_topic == dlq_topic)
    pair = tuple_(dlq_redrives.c.dlq_partition, dlq_redrives.c.dlq_offset)
    queries = [query] if positions is None else [query.where(pair.in_(chunk)) for chunk in chunks(sorted(set(positions)))]
    rows: list[Row[Any]] = []
    with translate("reading the redrive ledger"):
        async with store.engine.connect() as conn:
            for each in queries:
                rows += (await conn.execute(each)).all()
    return {(row.dlq_partition, row.dlq_offset): Redrive(row.target, row.redriven_at, row.sent_at) for row in rows}


async def claim_redrives(store: Store, dlq_topic: str, claims: Mapping[DlqPosition, str]) -> set[DlqPosition]:
    """Claim dead letters (position -> target) for a redrive; returns those claimed now.

    One that another redrive claimed first is left out: it is not ours to send.
    """
    if not claims:
        return set()
    now = datetime.now(UTC)
    rows = [
        {"dlq_topic": dlq_topic, "dlq_partition": partition, "dlq_offset": offset, "target": target, "redriven_at": now}
        for (partition, offset), target in sorted(claims.items())
    ]
    claimed: set[DlqPosition] = set()
    with translate("claiming dead letters for a redrive"):
        async with store.transaction() as conn:
            for chunk in chunks(rows):
                statement = (
                    dialect_insert(store.is_sqlite, dlq_redrives)
                    .values(chunk)
                    .on_conflict_do_nothing()
                    .returning(dlq_redrives.c.dlq_partition, dlq_redrives.c.dlq_offset)
                )
                claimed.update((row[0], row[1]) for row in await conn.execute(statement))
    return claimed


async def mark_sent(store: Store, dlq_topic: str, positions: Sequence[DlqPosition]) -> None:
    """Record that these claimed dead letters reached their target."""
    if not positions:
        return
    now = datetime.now(UTC)
    pair = tuple_(dlq_redrives.c.dlq_partition, dlq_redrives.c.dlq_offset)
    with translate("marking dead letters re-driven"):
        async with store.transaction() as conn:
            for chunk in chunks(positions):
                await conn.execute(update(dlq_redrives).where(dlq_redrives.c.dlq_topic == dlq_topic, pair.in_(chunk)).values(sent_at=now))
