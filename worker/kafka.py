"""The only module that imports aiokafka: group membership, fetch, commit, rebalance, produce.

Records leave this module as ``RawRecord`` and partitions as plain ints (one topic per
consumer), so nothing else depends on the client library; its errors become BrokerError.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner

from worker.config import KafkaSettings
from worker.errors import BrokerError
from worker.events import RawRecord

log = structlog.get_logger("worker.kafka")

PartitionsCallback = Callable[[set[int]], Awaitable[None]]


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by every client."""
    security = settings.security
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": security.protocol,
    }
    if security.protocol.startswith("SASL"):
        options["sasl_mechanism"] = security.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password.get_secret_value() if security.sasl_password else None
    if security.protocol.endswith("SSL"):
        context = ssl.create_default_context(cafile=security.ssl_cafile)
        if security.ssl_certfile:
            context.load_cert_chain(security.ssl_certfile, security.ssl_keyfile)
        options["ssl_context"] = context
    return options


@contextlib.contextmanager
def translate(action: str) -> Iterator[None]:
    """Turn aiokafka's errors into BrokerError, chained."""
    try:
        yield
    except KafkaError as exc:
        raise BrokerError(f"{action} failed: {type(exc).__name__}: {exc}") from exc


def _raw(record: Any) -> RawRecord:
    return RawRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value,
        headers=tuple(record.headers or ()),
    )


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._on_assigned({tp.partition for tp in assigned})


class Consumer:
    """A member of the consumer group on one topic; offsets are committed only when told."""

    def __init__(self, settings: KafkaSettings, *, group_id: str | None = None) -> None:
        self.topic = settings.topic
        self.group_id = group_id or settings.group_id
        self._settings = settings
        self._consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            max_poll_records=settings.max_batch_records,
            **client_options(settings),
        )

    async def start(self, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback) -> None:
        """Connect and join the group; the callbacks run inside every rebalance."""
        with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
            await self._consumer.start()
            self._consumer.subscribe([self.topic], listener=_Listener(on_revoked, on_assigned))

    async def stop(self) -> None:
        """Leave the group and close."""
        with translate("leaving the consumer group"):
            await self._consumer.stop()

    async def fetch(self, timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """Records by partition, each list in offset order; empty after ``timeout_ms`` idle."""
        with translate("fetching records"):
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return {tp.partition: [_raw(r) for r in records] for tp, records in batches.items() if records}

    async def commit(self, offsets: dict[int, int]) -> None:
        """Commit ``offsets`` (the next offset to read, per partition) for the group."""
        if offsets:
            with translate("committing offsets"):
                await self._consumer.commit({TopicPartition(self.topic, p): o for p, o in offsets.items()})

    async def committed(self, partition: int) -> int | None:
        """The group's committed offset for ``partition``."""
        with translate("reading the committed offset"):
            offset: int | None = await self._consumer.committed(TopicPartition(self.topic, partition))
        return offset

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` on."""
        self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def pause(self, partition: int) -> None:
        """Fetch nothing more from ``partition`` until :meth:`resume`."""
        self._consumer.pause(TopicPartition(self.topic, partition))

    def resume(self, partition: int) -> None:
        """Fetch from ``partition`` again."""
        self._consumer.resume(TopicPartition(self.topic, partition))

    def assignment(self) -> set[int]:
        """The partitions this member holds now."""
        return {tp.partition for tp in self._consumer.assignment()}

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """The log-end offset of each partition."""
        with translate("reading end offsets"):
            ends = await self._consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}


class Outgoing(NamedTuple):
    """A record to produce; ``partition`` None lets the key decide."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Sequence[tuple[str, bytes]]
    partition: int | None = None


class Producer:
    """An idempotent producer: every send waits for all in-sync replicas."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(enable_idempotence=True, acks="all", linger_ms=5, **client_options(settings))
        self._partitioner = DefaultPartitioner()

    async def __aenter__(self) -> Producer:
        with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
            await self._producer.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._producer.stop()

    async def partition_for(self, topic: str, key: bytes | None, fallback: int) -> int:
        """The partition a record goes to: the key's, as Kafka's default partitioner picks it.

        Keyless records go to ``fallback`` modulo the partition count, so the choice is
        known before sending and the same on every retry.
        """
        with translate(f"reading the partitions of {topic}"):
            partitions: list[int] = sorted(await self._producer.partitions_for(topic))
        if key is None:
            return partitions[fallback % len(partitions)]
        chosen: int = self._partitioner(key, partitions, partitions)
        return chosen

    async def send_many(self, records: Sequence[Outgoing]) -> None:
        """Send ``records`` in order and wait until every one is acknowledged."""
        with translate("producing records"):
            futures = [
                await self._producer.send(r.topic, value=r.value, key=r.key, headers=list(r.headers), partition=r.partition)
                for r in records
            ]
            for future in futures:
                await future


class Reader:
    """A consumer outside any group, for end offsets and reading back a range of a partition."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_options(settings))
        self._lock = asyncio.Lock()  # assign() is per consumer: one range read at a time

    async def __aenter__(self) -> Reader:
        with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
            await self._consumer.start()
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
                        found.extend(_raw(r) for r in batch.get(tp, []) if r.offset < end)
        return found


@contextlib.asynccontextmanager
async def admin(settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client for the duration of the block."""
    client = AIOKafkaAdminClient(**client_options(settings))
    with translate(f"connecting to Kafka at {settings.bootstrap_servers}"):
        await client.start()
    try:
        yield client
    finally:
        await client.close()


async def create_topics(settings: KafkaSettings, partitions: int, replication: int = 1) -> list[str]:
    """Create the event topic (``partitions`` partitions) and the DLQ and commands topics if missing."""
    created = []
    async with admin(settings) as client:
        existing = set(await client.list_topics())
        for name in (settings.topic, settings.dead_letter_topic, settings.commands_topic):
            if name in existing:
                continue
            try:
                with translate(f"creating topic {name}"):
                    await client.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=replication)])
            except BrokerError as exc:
                if not isinstance(exc.__cause__, TopicAlreadyExistsError):
                    raise
            created.append(name)
    return created


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
                    yield _raw(record)
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
