"""The ceiling: an aiokafka consumer-group member that only fetches and commits each batch.

It runs with the worker's own fetch settings (batch size, poll timeout), so the ratio to it
shows what decoding, handlers and the database cost on top of Kafka alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaConsumer

from bench.dataset import Topic
from bench.report import CEILING, Result, median


async def consume_once(topic: Topic, total: int, max_records: int, timeout_s: float) -> float:
    """Events/s of one fresh group member reading ``total`` records, from its first batch on."""
    consumer = AIOKafkaConsumer(
        topic.name,
        bootstrap_servers=topic.bootstrap,
        group_id=f"bench-raw-{uuid.uuid4().hex[:8]}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=max_records,
    )
    await consumer.start()
    try:
        seen = first = 0
        started = 0.0
        async with asyncio.timeout(timeout_s):
            while seen < total:
                batches = await consumer.getmany(timeout_ms=500, max_records=max_records)
                got = sum(len(records) for records in batches.values())
                if not got:
                    continue
                if not first:
                    started, first = time.perf_counter(), got
                seen += got
                await consumer.commit()
        elapsed = time.perf_counter() - started
    finally:
        await consumer.stop()
    return (total - first) / elapsed if elapsed > 0 else float("inf")


async def ceiling(topic: Topic, total: int, *, runs: int, max_records: int) -> Result:
    """The median of ``runs`` measurements, each in a fresh consumer group."""
    started = time.monotonic()
    rates = [await consume_once(topic, total, max_records, timeout_s=120) for _ in range(runs)]
    return Result(
        CEILING,
        total,
        rate=median(rates),
        seconds=time.monotonic() - started,
        note=f"median of {runs} runs, commit per fetched batch of up to {max_records} records" if runs > 1 else "",
        extra={"rates": rates},
    )
