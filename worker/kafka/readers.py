"""Reading outside any consumer group: the log end of a partition, one topic through, or a span of offsets (replay, dump, dlq)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from worker.config import KafkaSettings
from worker.events import RawRecord
from worker.kafka.admin import admin
from worker.kafka.client import client_options, raw_batches, raw_record, start_bounded, translate

log = structlog.get_logger("worker.kafka")


class Reader:
    """A consumer outside any group, for end offsets and reading back a range of a partition."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_options(settings))
        self._lock = asyncio.Lock()  # assign() is per consumer: one range read at a time

    async def __aenter__(self) -> Reader:
        await start_bounded(self._consumer, self._settings.bootstrap_servers, None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    async def end_offsets(self, partitions: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The log-end offset of each ``(topic, partition)``."""
        with translate("reading end offsets"):
            ends = await self._consumer.end_offsets([TopicPartition(t, p) for t, p in partitions])
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    async def read_range(self, topic: str, partition: int, start: int, end: int, timeout_s: float = 60.0) -> list[RawRecord]:
        """The records of one partition from ``start`` up to (not including) ``end``."""
        tp = TopicPartition(topic, partition)
        found: list[RawRecord] = []
        async with self._lock:
            with translate(f"reading back {topic}[{partition}] {start}..{end}"):
                self._consumer.assign([tp])
                self._consumer.seek(tp, start)
                async with asyncio.timeout(timeout_s):
                    while await self._consumer.position(tp) < end:
                        batch = await self._consumer.getmany(tp, timeout_ms=1000)
                        found.extend(raw_record(r) for r in batch.get(tp, []) if r.offset < end)
        return found


async def read_topic(settings: KafkaSettings, topic: str, *, idle_timeout_ms: int = 2_000) -> AsyncIterator[RawRecord]:
    """Every record of ``topic`` from the beginning to its current end, without a group."""
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **client_options(settings))
    with translate(f"reading topic {topic}"):
        await consumer.start()
    try:
        # A consumer without a subscription keeps no metadata for partitions_for_topic
        # (consumer.topics() does not fill it in), so ask the cluster.
        async with admin(settings) as client:
            with translate(f"describing topic {topic}"):
                described = await client.describe_topics([topic])
        partitions = {p["partition"] for found in described for p in found["partitions"]}
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        while remaining:
            batches = await consumer.getmany(*remaining, timeout_ms=idle_timeout_ms)
            if not batches:
                break
            for tp, records in batches.items():
                for record in records:
                    yield raw_record(record)
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


class PartitionReader:
    """Reads chosen partitions of one topic between offsets, outside any consumer group.

    Partitions are assigned, not subscribed: no group sees a member and nothing is committed,
    so a replay or a dump never moves a live group's offsets.
    """

    def __init__(self, settings: KafkaSettings, topic: str, *, timeout_s: float = 10.0) -> None:
        self.topic = topic
        self._settings = settings
        self._timeout_s = timeout_s
        self._consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **client_options(settings))

    async def __aenter__(self) -> PartitionReader:
        await start_bounded(self._consumer, self._settings.bootstrap_servers, self._timeout_s)
        # Let aiokafka's group-less coordinator task start: stopping a consumer before that
        # task first runs raises CancelledError out of stop().
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._consumer.stop()

    def _tps(self, partitions: Iterable[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in partitions]

    async def bounds(self, partitions: Iterable[int]) -> dict[int, tuple[int, int]]:
        """The first and the log-end offset of each partition."""
        tps = self._tps(partitions)
        with translate(f"reading the offsets of {self.topic}"):
            firsts = await self._consumer.beginning_offsets(tps)
            ends = await self._consumer.end_offsets(tps)
        return {tp.partition: (firsts[tp], ends[tp]) for tp in tps}

    async def offsets_for_time(self, partitions: Iterable[int], timestamp_ms: int) -> dict[int, int | None]:
        """Per partition, the first offset whose timestamp is at or after ``timestamp_ms`` (None: none is)."""
        with translate(f"looking up offsets by time in {self.topic}"):
            found = await self._consumer.offsets_for_times({tp: timestamp_ms for tp in self._tps(partitions)})
        return {tp.partition: (None if hit is None else hit.offset) for tp, hit in found.items()}

    def assign(self, positions: dict[int, int]) -> None:
        """Read exactly these partitions, each from its given offset."""
        tps = self._tps(sorted(positions))
        self._consumer.assign(tps)
        for tp in tps:
            self._consumer.seek(tp, positions[tp.partition])

    async def fetch_from(self, partitions: Iterable[int], timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """The next records of ``partitions`` (assigned ones), by partition in offset order."""
        with translate(f"fetching from {self.topic}"):
            batches = await self._consumer.getmany(*self._tps(partitions), timeout_ms=timeout_ms, max_records=max_records)
        return raw_batches(batches)

    async def position(self, partition: int) -> int:
        """The offset the next fetch of ``partition`` starts at."""
        with translate(f"reading the position in {self.topic}[{partition}]"):
            position: int = await self._consumer.position(TopicPartition(self.topic, partition))
        return position
