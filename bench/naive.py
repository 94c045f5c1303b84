"""The naive baseline: what a user writes after reading the Apps-Engine's message-counter example.

An aiokafka group member and, per event, one SQLAlchemy async transaction that reads the
global and the room counter, adds one and writes them back (SQLite through aiosqlite), with
no version checks: exact in a single process, but every event pays its own round trips. It
is slow, so it runs on a prefix of the topic for a bounded time and its rate is extrapolated.
SQLite runs with the worker's own settings (WAL, synchronous=NORMAL).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer
from sqlalchemy import Column, Integer, MetaData, String, Table, event, select
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from bench.dataset import TOTAL, Topic
from bench.report import NAIVE, Result

metadata = MetaData()
counters = Table("counters", metadata, Column("key", String, primary_key=True), Column("count", Integer, nullable=False))


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    # The worker's own SQLite settings (worker/persistence/store.py), so that the comparison
    # is between the two ways of working, not between two durability settings.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


async def _increment(conn: AsyncConnection, key: str) -> None:
    count = (await conn.execute(select(counters.c.count).where(counters.c.key == key))).scalar()
    if count is None:
        await conn.execute(counters.insert().values(key=key, count=1))
    else:
        await conn.execute(counters.update().where(counters.c.key == key).values(count=count + 1))


async def naive(topic: Topic, total: int, workdir: Path, *, cap_s: float, max_records: int) -> Result:
    """Run the baseline for at most ``cap_s`` seconds (or until ``total`` events) and check its counters."""
    started = time.monotonic()
    engine = create_async_engine(f"sqlite+aiosqlite:///{workdir / f'naive-{uuid.uuid4().hex[:8]}.db'}")
    event.listen(engine.sync_engine, "connect", _pragmas)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    consumer = AIOKafkaConsumer(
        topic.name,
        bootstrap_servers=topic.bootstrap,
        group_id=f"bench-naive-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_records,
    )
    expected: Counter[str] = Counter()
    done, first = 0, 0.0
    await consumer.start()
    try:
        async with asyncio.timeout(cap_s + 60):
            while done < total and (not first or time.perf_counter() - first < cap_s):
                batches = await consumer.getmany(timeout_ms=500, max_records=max_records)
                for tp, records in batches.items():
                    handled = 0
                    for record in records:
                        if first and time.perf_counter() - first >= cap_s:
                            break
                        first = first or time.perf_counter()
                        room = json.loads(record.value)["data"]["room"]["id"]
                        async with engine.begin() as conn:
                            await _increment(conn, TOTAL)
                            await _increment(conn, f"room:{room}")
                        expected.update((TOTAL, f"room:{room}"))
                        done += 1
                        handled += 1
                    if handled:
                        await consumer.commit({tp: records[handled - 1].offset + 1})
        elapsed = time.perf_counter() - first
        async with engine.connect() as conn:
            found = {key: count for key, count in await conn.execute(select(counters.c.key, counters.c.count))}
    finally:
        await consumer.stop()
        await engine.dispose()
    capped = done < total
    return Result(
        NAIVE,
        done,
        rate=done / elapsed if elapsed > 0 else None,
        exact=found == dict(expected),
        seconds=time.monotonic() - started,
        note=f"capped at {cap_s:.0f} s: {done} of {total} events, rate extrapolated" if capped else "",
    )
