"""Where the running workers of a group can be asked about themselves (``worker_members``).

Each worker's monitor renews its row every few seconds; the status pages list the rows
renewed recently and ask each URL for the member's status. A row is deleted when its
worker stops cleanly, and rows of workers that vanished are pruned by the next heartbeat
of any worker of the group after ``STALE_AFTER_S``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select

from worker.persistence.schema import worker_members
from worker.persistence.sql import dialect_insert, translate
from worker.persistence.store import Store

# A row not renewed for this long is a worker that is gone (killed, partitioned away).
STALE_AFTER_S = 3600.0


@dataclass(frozen=True, slots=True)
class Member:
    """A worker as its last heartbeat described it."""

    member: str
    group_id: str
    topic: str
    host: str
    kafka_member_id: str | None
    url: str | None
    started_at: datetime
    seen_at: datetime


async def heartbeat(store: Store, member: Member) -> None:
    """Insert or renew ``member``'s row, and prune the group's rows gone stale."""
    values = {
        "member": member.member,
        "group_id": member.group_id,
        "topic": member.topic,
        "host": member.host,
        "kafka_member_id": member.kafka_member_id,
        "url": member.url,
        "started_at": member.started_at,
        "seen_at": member.seen_at,
    }
    statement = dialect_insert(store.is_sqlite, worker_members).values(values)
    statement = statement.on_conflict_do_update(
        index_elements=[worker_members.c.member],
        set_={"kafka_member_id": member.kafka_member_id, "url": member.url, "seen_at": member.seen_at},
    )
    cutoff = member.seen_at - timedelta(seconds=STALE_AFTER_S)
    with translate("renewing the worker's member row"):
        async with store.transaction() as conn:
            await conn.execute(statement)
            await conn.execute(
                delete(worker_members).where(worker_members.c.group_id == member.group_id, worker_members.c.seen_at < cutoff)
            )


async def leave(store: Store, member: str) -> None:
    """Delete ``member``'s row (a clean stop)."""
    with translate("deleting the worker's member row"):
        async with store.transaction() as conn:
            await conn.execute(delete(worker_members).where(worker_members.c.member == member))


async def recent(store: Store, group_id: str, topic: str, within_s: float) -> list[Member]:
    """The members of ``group_id`` on ``topic`` renewed within the last ``within_s`` seconds."""
    since = datetime.now(UTC) - timedelta(seconds=within_s)
    query = (
        select(worker_members)
        .where(worker_members.c.group_id == group_id, worker_members.c.topic == topic, worker_members.c.seen_at >= since)
        .order_by(worker_members.c.started_at)
    )
    with translate("reading worker members"):
        async with store.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
    return [Member(r.member, r.group_id, r.topic, r.host, r.kafka_member_id, r.url, _aware(r.started_at), _aware(r.seen_at)) for r in rows]


def _aware(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes for what was written as UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
