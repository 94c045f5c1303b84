"""Read-only, paged queries for the status pages (``worker.web``): never used by the worker's loop.

Every list is a page: keyset pagination over an index (``records`` by ``(app_id, id)``,
``record_associations`` by ``(app_id, association, record_id)``), so a page costs the same
with a hundred records or a hundred thousand. Same rules as ``store.py``: SQLAlchemy errors
are translated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, false, func, or_, select

from worker.persistence.schema import dlq_redrives, outbox, partition_offsets, record_associations, records
from worker.persistence.sql import stored, translate
from worker.persistence.store import Store
from worker.persistence.unit import StoredRecord


@dataclass(frozen=True, slots=True)
class PartitionClaim:
    """A partition's row in the database: who claimed it last, under which generation, and the offset stored with the state."""

    partition: int
    owner: str
    generation: int
    next_offset: int | None


@dataclass(frozen=True, slots=True)
class RecordsPage:
    """One page of an app's records, and the id to continue after (None on the last page)."""

    records: list[StoredRecord]
    next_after: str | None


async def claims(store: Store, group_id: str, topic: str) -> dict[int, PartitionClaim]:
    """Every partition claim of ``group_id`` on ``topic``."""
    query = select(partition_offsets).where(partition_offsets.c.group_id == group_id, partition_offsets.c.topic == topic)
    with translate("reading partition claims"):
        async with store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
    return {row.partition: PartitionClaim(row.partition, row.owner, row.generation, row.next_offset) for row in rows}


async def app_ids(store: Store) -> list[str]:
    """The apps that have records, in order (a loose walk of the primary key: one lookup per app)."""
    found: list[str] = []
    with translate("listing apps"):
        async with store.engine.connect() as conn:
            # PostgreSQL has no skip scan: take the next app id after the last, one index lookup each.
            while True:
                query = select(func.min(records.c.app_id))
                if found:
                    query = query.where(records.c.app_id > found[-1])
                app_id = await conn.scalar(query)
                if app_id is None:
                    return found
                found.append(app_id)


async def records_page(store: Store, app_id: str, association: str | None, after: str | None, limit: int) -> RecordsPage:
    """Up to ``limit`` records of ``app_id`` after id ``after``, ordered by id; with ``association``, only those that have it."""
    if association:
        ids = (
            select(record_associations.c.record_id)
            .where(record_associations.c.app_id == app_id, record_associations.c.association == association)
            .order_by(record_associations.c.record_id)
        )
        if after is not None:
            ids = ids.where(record_associations.c.record_id > after)
        query = select(records).where(records.c.app_id == app_id, records.c.id.in_(ids.limit(limit + 1).scalar_subquery()))
    else:
        query = select(records).where(records.c.app_id == app_id)
        if after is not None:
            query = query.where(records.c.id > after)
    query = query.order_by(records.c.id).limit(limit + 1)
    with translate("reading records"):
        async with store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
    found = [stored(row) for row in rows[:limit]]
    return RecordsPage(found, found[-1].id if len(rows) > limit else None)


async def association_models(store: Store, app_id: str, limit: int = 50) -> list[str]:
    """Some associations of ``app_id``, the first of each model (``room:``, ``user:``...), as search examples."""
    with translate("reading associations"):
        async with store.engine.connect() as conn:
            rows = await conn.execute(
                select(record_associations.c.association)
                .where(record_associations.c.app_id == app_id)
                .order_by(record_associations.c.association)
                .limit(limit)
            )
            return [row.association for row in rows]


async def outbox_backlog_by_topic(store: Store) -> dict[str, int]:
    """Outbox rows committed but not yet published, per target topic."""
    query = select(outbox.c.topic, func.count()).where(outbox.c.published_at.is_(None)).group_by(outbox.c.topic)
    with translate("counting the outbox backlog"):
        async with store.engine.connect() as conn:
            return {row[0]: int(row[1]) for row in await conn.execute(query)}


@dataclass(frozen=True, slots=True)
class LedgerSize:
    """How many dead letters of a topic the redrive ledger has claimed, and how many of those it sent."""

    claimed: int
    sent: int


def _within(dlq_topic: str, spans: Mapping[int, tuple[int, int]]) -> ColumnElement[bool]:
    """The ledger's rows of ``dlq_topic`` within ``spans`` (partition -> first and last offset): primary-key ranges."""
    ranges = [
        and_(dlq_redrives.c.dlq_partition == p, dlq_redrives.c.dlq_offset.between(first, last))
        for p, (first, last) in sorted(spans.items())
    ]
    return and_(dlq_redrives.c.dlq_topic == dlq_topic, or_(false(), *ranges))


async def ledger_size(store: Store, dlq_topic: str, spans: Mapping[int, tuple[int, int]]) -> LedgerSize:
    """The redrive ledger's counts for ``dlq_topic`` within ``spans`` (partition -> first and last offset)."""
    if not spans:
        return LedgerSize(0, 0)
    query = select(func.count(), func.count(dlq_redrives.c.sent_at)).where(_within(dlq_topic, spans))
    with translate("counting re-driven dead letters"):
        async with store.engine.connect() as conn:
            claimed, sent = (await conn.execute(query)).one()
    return LedgerSize(int(claimed or 0), int(sent or 0))


async def ledger_positions(store: Store, dlq_topic: str, spans: Mapping[int, tuple[int, int]]) -> set[tuple[int, int]]:
    """The (partition, offset) of every dead letter of ``dlq_topic`` within ``spans`` that the redrive ledger has claimed."""
    if not spans:
        return set()
    query = select(dlq_redrives.c.dlq_partition, dlq_redrives.c.dlq_offset).where(_within(dlq_topic, spans))
    with translate("reading the redrive ledger"):
        async with store.engine.connect() as conn:
            return {(row[0], row[1]) for row in await conn.execute(query)}
