"""The only module that imports aiokafka: group membership, fetch, commit, rebalance, produce.

Records leave this module as ``RawRecord`` and partitions as plain ints (one topic per
consumer), so nothing else depends on the client library; its errors become BrokerError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker import constants
from worker.config import KafkaSettings
from worker.errors import BrokerError, ConfigError, RecordTooLargeError
from worker.events import RawRecord

log = structlog.get_logger("worker.kafka")

PartitionsCallback = Callable[[set[int]], Awaitable[None]]


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by every client.

    Raises:
        ConfigError: SASL without a username or password, or a TLS file that cannot be loaded.

    """
    security = settings.security
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "request_timeout_ms": settings.request_timeout_ms,
        "security_protocol": security.protocol,
    }
    if security.protocol.startswith("SASL"):
        if not security.sasl_username or security.sasl_password is None:
            raise ConfigError(
                f"kafka.security.protocol is {security.protocol}, which needs kafka.security.sasl_username and "
                "kafka.security.sasl_password (env RC_WORKER_KAFKA__SECURITY__SASL_USERNAME / __SASL_PASSWORD)"
            )
        # aiokafka takes the same two options for PLAIN and for SCRAM-SHA-256/512.
        options["sasl_mechanism"] = security.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password.get_secret_value()
    if security.protocol.endswith("SSL"):
        options["ssl_context"] = _ssl_context(settings)
    return options


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    security = settings.security
    key = "kafka.security.ssl_cafile"
    try:
        # No cafile: the system's trusted CAs, as for any TLS client; hostnames are checked.
        context = ssl.create_default_context(cafile=security.ssl_cafile)
        if security.ssl_certfile:
            key = "kafka.security.ssl_certfile"
            context.load_cert_chain(security.ssl_certfile, security.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load the TLS certificate or key: {exc}; check the path and that it is PEM") from exc
    return context


class _ConnectFailures(logging.Handler):
    """Remembers the last authentication or TLS failure aiokafka logged.

    aiokafka logs why it could not connect to a broker, then raises a bare "Unable to
    bootstrap"; with this, a failed start-up can say "authentication failed" instead.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, SaslAuthenticationFailed | UnsupportedSaslMechanismError | ssl.SSLError):
                self.count += 1
                self.last = arg


_connect_failures = _ConnectFailures()
logging.getLogger("aiokafka").addHandler(_connect_failures)


def _explain(failure: BaseException) -> str:
    if isinstance(failure, ssl.SSLError):
        return f"TLS handshake failed ({failure}); check kafka.security.ssl_cafile, ssl_certfile and ssl_keyfile"
    return (
        f"authentication failed ({failure}); check kafka.security.sasl_mechanism, sasl_username and "
        "sasl_password (env RC_WORKER_KAFKA__SECURITY__SASL_PASSWORD)"
    )


@contextlib.contextmanager
def translate(action: str) -> Iterator[None]:
    """Turn aiokafka's errors into BrokerError, chained; an authentication or TLS failure is named."""
    failures = _connect_failures.count
    try:
        yield
    except KafkaError as exc:
        failure = _connect_failures.last if _connect_failures.count != failures else None
        if failure is not None:
            raise BrokerError(f"{action} failed: {_explain(failure)}") from exc
        raise BrokerError(f"{action} failed: {type(exc).__name__}: {exc}") from exc


def _raw(record: Any) -> RawRecord:
    return RawRecord(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        timestamp_ms=record.timestamp,
        key=record.key,
        value=record.value,
        # Kafka allows a header without a value (null); to us it is an empty one.
        headers=tuple((name, value if value is not None else b"") for name, value in record.headers or ()),
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
        self._coordinator_lost: float | None = None
        self._consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            # How long the coordinator waits for members to rejoin. aiokafka's default is the
            # session timeout, but on revoke a member first finishes its lanes' batches (up to
            # processing.shutdown_timeout_s): one slower than that is dropped, rejoins, and
            # starts the next rebalance, round after round. Java binds it to max.poll.interval.ms.
            rebalance_timeout_ms=max(settings.session_timeout_ms, settings.max_poll_interval_ms),
            max_poll_records=settings.max_batch_records,
            group_instance_id=None if group_id else settings.group_instance_id,
            **client_options(settings),
        )

    async def start(self, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback) -> None:
        """Connect and join the group; the callbacks run inside every rebalance."""
        try:
            with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
                await self._consumer.start()
                self._consumer.subscribe([self.topic], listener=_Listener(on_revoked, on_assigned))
        except BaseException:
            await _close(self._consumer)  # a half-started client keeps sockets and tasks
            raise

    async def stop(self) -> None:
        """Leave the group and close."""
        with translate("leaving the consumer group"):
            try:
                await self._consumer.stop()
            except asyncio.CancelledError:
                # aiokafka (0.14) awaits its own cancelled fetch tasks when it closes while a
                # broker is unreachable, and re-raises their cancellation: not ours, unless
                # this task is being cancelled. Its client was not closed then; close it.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                await self._consumer._client.close()

    async def fetch(self, timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """Records by partition, each list in offset order; empty after ``timeout_ms`` idle.

        Raises:
            BrokerError: nothing came and the group coordinator has been unreachable for a
                while: aiokafka waits for it in silence, the worker says so.

        """
        with translate("fetching records"):
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        found = {tp.partition: [_raw(r) for r in records] for tp, records in batches.items() if records}
        if not found:
            self._check_coordinator()
        return found

    def _check_coordinator(self) -> None:
        # A coordinator is briefly unknown at start-up and when it moves: only an absence
        # longer than a heartbeat session is reported.
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is None or coordinator.coordinator_id is not None:
            self._coordinator_lost = None
            return
        now = time.monotonic()
        self._coordinator_lost = self._coordinator_lost or now
        waited = now - self._coordinator_lost
        if waited * 1000 >= self._settings.session_timeout_ms:
            raise BrokerError(
                f"the group coordinator of {self.group_id} at {self._settings.bootstrap_servers} has been unreachable "
                f"for {waited:.0f}s; waiting for the broker to come back (nothing is lost meanwhile)"
            )

    async def commit(self, offsets: dict[int, int], metadata: dict[int, str] | None = None) -> None:
        """Commit ``offsets`` (the next offset to read, per partition) for the group, with optional metadata."""
        if offsets:
            notes = metadata or {}
            coordinator = getattr(self._consumer, "_coordinator", None)
            if coordinator is not None and coordinator.coordinator_id is None:
                # aiokafka would wait for the coordinator forever, and the loop with it.
                raise BrokerError("committing offsets failed: the group coordinator is unreachable; they are committed once it is back")
            # Bounded like a heartbeat session: a commit that waits longer holds up the loop, and
            # a coordinator that silent is gone (the next commit says so at once).
            limit_ms = min(self._settings.request_timeout_ms, self._settings.session_timeout_ms)
            try:
                with translate("committing offsets"):
                    async with asyncio.timeout(limit_ms / 1000):
                        await self._consumer.commit({TopicPartition(self.topic, p): (o, notes.get(p, "")) for p, o in offsets.items()})
            except TimeoutError:
                raise BrokerError(f"committing offsets failed: no answer within {limit_ms} ms") from None

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

    async def lag(self) -> dict[int, int]:
        """Records between the fetch position and the log end, per assigned partition."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return {}
        with translate("measuring consumer lag"):
            ends = await self._consumer.end_offsets(assigned)
            return {tp.partition: max(0, ends[tp] - await self._consumer.position(tp)) for tp in assigned}

    def member_id(self) -> str | None:
        """The id the group coordinator gave this member (what ``describe_group_members`` lists), once joined."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        member_id = getattr(coordinator, "member_id", None)
        return member_id if isinstance(member_id, str) and member_id else None

    def in_group(self) -> bool:
        """Whether this member holds a generation of the group and can reach its coordinator."""
        # aiokafka has no public call for this; its group coordinator is the only source.
        coordinator = getattr(self._consumer, "_coordinator", None)
        return coordinator is not None and coordinator.coordinator_id is not None and coordinator.generation > 0


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
        try:
            with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
                await self._producer.start()
        except BaseException:
            await _close(self._producer)  # a half-started client keeps sockets and tasks
            raise
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
                await _close(fresh)
                raise
            self._producer = fresh
        log.info("producer_renewed", reason="the broker refused a batch of the idempotent producer")
        await _close(old)  # what other sends queued on it still goes out (or fails, and is sent again)

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


class Reader:
    """A consumer outside any group, for end offsets and reading back a range of a partition."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._consumer = AIOKafkaConsumer(enable_auto_commit=False, **client_options(settings))
        self._lock = asyncio.Lock()  # assign() is per consumer: one range read at a time

    async def __aenter__(self) -> Reader:
        try:
            with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
                await self._consumer.start()
        except BaseException:
            await _close(self._consumer)  # a half-started client keeps sockets and tasks
            raise
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


def record_bytes(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """At most how many bytes a record takes in a batch of its own: what both size limits count."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


async def max_message_bytes(client: AIOKafkaAdminClient, topic: str | None) -> int | None:
    """``topic``'s effective max.message.bytes, or (``None``) the broker's default; None if the cluster does not say."""
    if topic is None:
        with translate("describing the cluster"):
            brokers = (await client.describe_cluster())["brokers"]
        if not brokers:
            return None
        resource = ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["node_id"]), configs={"message.max.bytes": None})
    else:
        resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"max.message.bytes": None})
    with translate(f"reading the configuration of {topic or 'the broker'}"):
        responses = await client.describe_configs([resource])
    for response in responses:
        for error_code, _message, _type, _name, entries in response.resources:
            for name, value, *_ in entries if not error_code else ():
                if name in ("max.message.bytes", "message.max.bytes") and value:
                    return int(value)
    return None


async def create_topics(settings: KafkaSettings, partitions: int, replication: int = 1) -> list[str]:
    """Create the event topic (``partitions`` partitions) and the DLQ and commands topics if missing.

    The dead-letter topic takes the event topic's max.message.bytes plus
    ``RECORD_HEADROOM_BYTES``, so any record the event topic holds can be dead-lettered whole
    with its rc-dlq-* headers. (Commands need nothing special: ``MAX_COMMAND_BYTES`` is well
    within Kafka's default.)
    """
    created = []
    async with admin(settings) as client:
        existing = set(await client.list_topics())
        # A new event topic gets the broker's default; an existing one may have its own.
        event_limit = await max_message_bytes(client, settings.topic if settings.topic in existing else None)
        dead_letter_limit = (event_limit or constants.KAFKA_DEFAULT_MAX_MESSAGE_BYTES) + constants.RECORD_HEADROOM_BYTES
        for name in (settings.topic, settings.dead_letter_topic, settings.commands_topic):
            if name in existing:
                if name == settings.dead_letter_topic:
                    await _warn_if_smaller(client, name, dead_letter_limit)
                continue
            configs = {"max.message.bytes": str(dead_letter_limit)} if name == settings.dead_letter_topic else {}
            try:
                with translate(f"creating topic {name}"):
                    await client.create_topics(
                        [NewTopic(name, num_partitions=partitions, replication_factor=replication, topic_configs=configs)]
                    )
            except BrokerError as exc:
                if not isinstance(exc.__cause__, TopicAlreadyExistsError):
                    raise
            created.append(name)
    if settings.producer_max_request_bytes < dead_letter_limit:
        log.warning(
            "producer_max_request_bytes_too_small",
            producer_max_request_bytes=settings.producer_max_request_bytes,
            dead_letter_max_message_bytes=dead_letter_limit,
            hint="set kafka.producer_max_request_bytes to the dead-letter topic's limit, or near-limit dead letters are truncated",
        )
    return created


async def _warn_if_smaller(client: AIOKafkaAdminClient, topic: str, needed: int) -> None:
    found = await max_message_bytes(client, topic)
    if found is not None and found < needed:
        log.warning(
            "topic_max_message_bytes_too_small",
            topic=topic,
            max_message_bytes=found,
            needed=needed,
            hint=f"kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config max.message.bytes={needed}; "
            "until then larger dead letters are truncated",
        )


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


# -- tools: reading ranges outside any group, and administering a group (rc-worker replay,
#    dump, dlq, offsets) ----------------------------------------------------------------------


async def _start_bounded(client: Any, bootstrap: str, timeout_s: float) -> None:
    """Start ``client`` within ``timeout_s``: an operator's command must not hang on a dead broker."""
    try:
        with translate(f"connecting to Kafka at {bootstrap}"):
            async with asyncio.timeout(timeout_s):
                await client.start()
    except TimeoutError:
        await _close(client)
        raise BrokerError(f"connecting to Kafka at {bootstrap} failed: no answer within {timeout_s:g}s; is the broker running?") from None
    except BaseException:
        await _close(client)
        raise


async def _close(client: Any) -> None:
    stop = getattr(client, "stop", None) or client.close
    with contextlib.suppress(KafkaError, OSError):
        await stop()


async def topic_partitions(settings: KafkaSettings, topic: str, timeout_s: float = 10.0) -> list[int]:
    """The partitions of ``topic``; empty if it does not exist."""
    client = AIOKafkaAdminClient(**client_options(settings))
    await _start_bounded(client, settings.bootstrap_servers, timeout_s)
    try:
        with translate(f"describing topic {topic}"):
            described = await client.describe_topics([topic])
    finally:
        await client.close()
    return sorted({p["partition"] for found in described if not found["error_code"] for p in found["partitions"]})


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
        await _start_bounded(self._consumer, self._settings.bootstrap_servers, self._timeout_s)
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

    async def fetch(self, partitions: Iterable[int], timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """The next records of ``partitions`` (assigned ones), by partition in offset order."""
        with translate(f"fetching from {self.topic}"):
            batches = await self._consumer.getmany(*self._tps(partitions), timeout_ms=timeout_ms, max_records=max_records)
        return {tp.partition: [_raw(r) for r in records] for tp, records in batches.items() if records}

    async def position(self, partition: int) -> int:
        """The offset the next fetch of ``partition`` starts at."""
        with translate(f"reading the position in {self.topic}[{partition}]"):
            position: int = await self._consumer.position(TopicPartition(self.topic, partition))
        return position


class GroupInfo(NamedTuple):
    """A consumer group's state (``Empty``, ``Stable``, ``Dead``...) and its active members."""

    state: str
    members: list[str]  # "client-id@host" of each


async def describe_group(settings: KafkaSettings, group_id: str, timeout_s: float = 10.0) -> GroupInfo:
    """The state and the active members of ``group_id``."""
    state, members = await describe_group_members(settings, group_id, None, timeout_s)
    return GroupInfo(state, [f"{m.client_id}@{m.host}" for m in members])


class GroupMember(NamedTuple):
    """One active member of a consumer group as the coordinator describes it."""

    member_id: str
    client_id: str
    host: str
    partitions: tuple[int, ...]  # of the topic asked about


async def describe_group_members(
    settings: KafkaSettings, group_id: str, topic: str | None, timeout_s: float = 10.0
) -> tuple[str, list[GroupMember]]:
    """The state of ``group_id`` and each active member with the partitions of ``topic`` (if given) assigned to it."""
    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment

    client = AIOKafkaAdminClient(**client_options(settings))
    await _start_bounded(client, settings.bootstrap_servers, timeout_s)
    try:
        with translate(f"describing consumer group {group_id}"):
            responses = await client.describe_consumer_groups([group_id])
    finally:
        await client.close()
    for response in responses:
        for group in response.to_object()["groups"]:
            if group["group"] != group_id:
                continue
            members = []
            for m in group["members"]:
                partitions: list[int] = []
                if topic is not None and m["member_assignment"]:
                    assignment = ConsumerProtocolMemberAssignment.decode(m["member_assignment"])
                    partitions = sorted(p for t, ps in assignment.assignment if t == topic for p in ps)
                members.append(GroupMember(m["member_id"], m["client_id"], m["client_host"].lstrip("/"), tuple(partitions)))
            return group["state"], sorted(members, key=lambda m: (m.partitions[:1], m.member_id))
    return "Dead", []


async def group_offsets(settings: KafkaSettings, group_id: str, topic: str, timeout_s: float = 10.0) -> dict[int, tuple[int, str]]:
    """The committed ``(offset, metadata)`` of ``group_id`` per partition of ``topic`` that has one."""
    client = AIOKafkaAdminClient(**client_options(settings))
    await _start_bounded(client, settings.bootstrap_servers, timeout_s)
    try:
        with translate(f"reading the offsets of consumer group {group_id}"):
            found = await client.list_consumer_group_offsets(group_id)
    finally:
        await client.close()
    return {tp.partition: (meta.offset, meta.metadata or "") for tp, meta in found.items() if tp.topic == topic and meta.offset >= 0}


async def commit_group_offsets(
    settings: KafkaSettings, group_id: str, topic: str, offsets: dict[int, int], timeout_s: float = 10.0
) -> None:
    """Set ``group_id``'s committed offsets from outside the group, as Kafka's reset tool does.

    The broker accepts such a commit only while the group has no active member.
    """
    consumer = AIOKafkaConsumer(group_id=group_id, enable_auto_commit=False, **client_options(settings))
    await _start_bounded(consumer, settings.bootstrap_servers, timeout_s)
    try:
        tps = {p: TopicPartition(topic, p) for p in offsets}
        consumer.assign(list(tps.values()))
        with translate(f"committing offsets for consumer group {group_id}"):
            await consumer.commit({tps[p]: offset for p, offset in offsets.items()})
    finally:
        await consumer.stop()
