"""Publishing records (commands, dead letters) with idempotence, the producer's size limit, and a restart after a fenced producer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
)
from aiokafka.partitioner import DefaultPartitioner

from worker.config import KafkaSettings
from worker.errors import RecordTooLargeError
from worker.kafka.admin import admin, max_message_bytes
from worker.kafka.client import client_options, close_quietly, record_bytes, start_bounded, translate

log = structlog.get_logger("worker.kafka")


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
        self._producer = self._client()
        self._partitioner = DefaultPartitioner()
        self._renewing = asyncio.Lock()
        self._limits: dict[str, int] = {}  # topic -> the largest record it takes from us
        self._refused: dict[str, int] = {}  # topic -> the smallest record its broker refused

    def _client(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            enable_idempotence=True,
            acks="all",
            linger_ms=5,
            max_request_size=self._settings.producer_max_request_bytes,
            **client_options(self._settings),
        )

    async def __aenter__(self) -> Producer:
        await start_bounded(self._producer, self._settings.bootstrap_servers, None)
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
        """Send ``records`` in order and wait until every one is acknowledged.

        Raises:
            RecordTooLargeError: a record was refused as too large; those before it were sent,
                later ones perhaps not. :meth:`max_record_bytes` says what fits.
            BrokerError: Kafka failed; some of the records may have been sent.

        """
        producer = self._producer  # one client for the whole call, though another call may renew it
        futures = []
        refused: set[int] = set()
        with translate("producing records"):
            for index, r in enumerate(records):
                try:
                    futures.append(await producer.send(r.topic, value=r.value, key=r.key, headers=list(r.headers), partition=r.partition))
                except MessageSizeTooLargeError:
                    refused.add(index)  # over max_request_size: refused before sending, and nothing after it is sent
                    break
            outcomes: list[Any] = await asyncio.gather(*futures, return_exceptions=True)
        by_broker = {i for i, outcome in enumerate(outcomes) if isinstance(outcome, MessageSizeTooLargeError)}
        if by_broker or any(isinstance(outcome, OutOfOrderSequenceNumber) for outcome in outcomes):
            # aiokafka does not rewind an idempotent producer's sequence numbers past a batch the
            # broker refused, so every later send to that partition would fail with
            # OutOfOrderSequenceNumber: a new client, with a new producer id, starts afresh.
            await self._renew(producer)
        if refused or by_broker:
            raise self._too_large(records, refused, by_broker)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                with translate("producing records"):
                    raise outcome

    def _too_large(self, records: Sequence[Outgoing], refused: set[int], by_broker: set[int]) -> RecordTooLargeError:
        for index in by_broker:
            topic, size = records[index].topic, record_bytes(records[index].key, records[index].value, records[index].headers)
            self._limits.pop(topic, None)  # the topic takes less than we thought
            self._refused[topic] = min(size, self._refused.get(topic, size))
        first = records[min(refused | by_broker)]
        maximum = self._settings.producer_max_request_bytes
        limit = "its topic's max.message.bytes" if by_broker else f"kafka.producer_max_request_bytes ({maximum})"
        return RecordTooLargeError(
            f"producing records failed: a record of {record_bytes(first.key, first.value, first.headers)} bytes for {first.topic} "
            f"is larger than {limit}"
        )

    async def _renew(self, old: AIOKafkaProducer) -> None:
        async with self._renewing:
            if self._producer is not old:
                return  # another send renewed it already
            fresh = self._client()
            try:
                with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
                    await fresh.start()
            except BaseException:
                await close_quietly(fresh)
                raise
            self._producer = fresh
        log.info("producer_renewed", reason="the broker refused a batch of the idempotent producer")
        await close_quietly(old)  # what other sends queued on it still goes out (or fails, and is sent again)

    async def max_record_bytes(self, topic: str) -> int:
        """The largest record ``topic`` takes from this producer: its max.message.bytes, at most kafka.producer_max_request_bytes."""
        limit = self._limits.get(topic)
        if limit is None:
            async with admin(self._settings) as client:
                found = await max_message_bytes(client, topic)
            limit = min(self._settings.producer_max_request_bytes, found or self._settings.producer_max_request_bytes)
            if found is None and topic in self._refused:
                # The cluster does not tell us (no DescribeConfigs permission): it refused a
                # record of that size, so halve it until records fit.
                limit = min(limit, self._refused[topic] // 2)
            self._limits[topic] = limit
        return limit
