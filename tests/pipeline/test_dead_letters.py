"""Dead letters of records near Kafka's size limits still reach the dead-letter topic, and never block the outbox.

A dead letter is its record plus rc-dlq-* headers: `rc-worker topics create` gives the
dead-letter topic room for that, and one still too large for its topic or the producer is
published cut short, marked ``rc-dlq-truncated``. A command that large is refused when staged.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import MessageSizeTooLargeError
from structlog.testing import capture_logs

from tests.support import TopicSet, store_for, wait_until
from tests.test_failures import (
    STRUCTURED,
    check_letter,
    counted,
    dead_letters,
    event_value,
    message_count,
    originals,
    produce,
    room_counts,
    running,
    settings_for,
    until,
)
from worker import App, Message, constants
from worker.config import KafkaSettings
from worker.events import RawRecord
from worker.kafka import Outgoing, admin, create_topics, max_message_bytes, record_bytes
from worker.pipeline.dead_letters import truncate
from worker.testing import Harness, message

# A record with a 4-byte key, no headers and an n-byte value (n >= 16384) takes n + 76 bytes
# as a batch of its own: 61 of batch header, 15 of record framing.
BATCH_OVERHEAD = 76


def events(prefix: str, key: bytes, count: int) -> list[tuple[bytes, bytes, tuple[tuple[str, bytes], ...]]]:
    """``count`` valid PostMessageSent records, all with ``key`` (one partition)."""
    return [(key, event_value(f"{prefix}-{uuid.uuid4().hex[:6]}-{n}", f"r{n % 2}"), STRUCTURED) for n in range(count)]


async def limit_of(settings: KafkaSettings, topic: str) -> int:
    """``topic``'s effective max.message.bytes, as the broker reports it (a new topic may take a moment to be known)."""

    async def described() -> int | None:
        async with admin(settings) as client:
            return await max_message_bytes(client, topic)

    found: int = await wait_until(described, 30, interval=0.2, what=f"the configuration of {topic}")
    return found


async def produce_one(bootstrap: str, topic: str, key: bytes, value: bytes, compression: str | None = None) -> None:
    """Produce one record with a producer that leaves the size check to the broker."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=8_000_000, compression_type=compression)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value=value, key=key)
    finally:
        await producer.stop()


async def backlog(url: str) -> int:
    """Outbox rows not yet published."""
    async with store_for(url) as store:
        return await store.outbox_backlog()


def where(letter: RawRecord) -> tuple[int, int]:
    """The (partition, offset) a dead letter's record had on the event topic."""
    return int(letter.header(constants.DLQ_PARTITION) or -1), int(letter.header(constants.DLQ_OFFSET) or -1)


def check_cut(letter: RawRecord, original: RawRecord, topic: str, limit: int) -> None:
    """A truncated dead letter: the value's first bytes, the original size, origin headers; within ``limit``."""
    assert original.value is not None
    assert letter.header(constants.DLQ_TRUNCATED) == str(len(original.value)).encode()
    assert letter.value is not None
    assert original.value.startswith(letter.value)
    assert limit - 2_000 < len(letter.value) < limit  # cut to fit, not emptied
    assert letter.key == original.key
    assert letter.header(constants.DLQ_TOPIC) == topic.encode()
    assert where(letter) == (original.partition, original.offset)


@pytest.mark.kafka
class TestTopicsCreate:
    """`rc-worker topics create` sizes the dead-letter topic for any record of the event topic."""

    async def test_dead_letter_topic_takes_the_event_topic_limit_plus_headroom(self, kafka_bootstrap: str) -> None:
        """An event topic of 2,000,000 bytes gets a dead-letter topic of 2,065,536, and a warning that the producer's limit is lower."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        settings = TopicSet(kafka_bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}").kafka_settings()
        async with admin(settings) as client:
            await client.create_topics([NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "2000000"})])

        with capture_logs() as logs:
            created = await create_topics(settings, partitions=1)

        assert created == [settings.dead_letter_topic, settings.commands_topic]
        [warned] = [e for e in logs if e["event"] == "producer_max_request_bytes_too_small"]  # the default is below 2,065,536
        assert warned["dead_letter_max_message_bytes"] == 2_000_000 + constants.RECORD_HEADROOM_BYTES
        assert await limit_of(settings, settings.dead_letter_topic) == 2_000_000 + constants.RECORD_HEADROOM_BYTES


@pytest.mark.kafka
class TestNearLimitRecords:
    """A record as large as the event topic holds is dead-lettered whole."""

    async def test_record_at_the_event_topic_limit_is_dead_lettered_byte_for_byte(self, topics: TopicSet, sqlite_url: str) -> None:
        """The largest record the event topic takes lands in the DLQ untouched; the valid events after it are counted."""
        key = b"near"
        at_limit = await limit_of(topics.kafka_settings(), topics.topic) - BATCH_OVERHEAD
        with pytest.raises(MessageSizeTooLargeError):  # one byte more and the broker refuses it: this is the limit
            await produce_one(topics.bootstrap, topics.topic, key, b" " * (at_limit + 1))
        before, after = events("before", key, 3), events("after", key, 5)
        await produce(topics.bootstrap, topics.topic, [*before, (key, b" " * at_limit, ()), *after])

        async with running(settings_for(topics, sqlite_url), [message_count()]):
            await until(counted(sqlite_url, room_counts(before + after)), 60, "the valid events counted")
            await dead_letters(topics, at_least=1, within=60)

        [letter] = await dead_letters(topics)
        original = (await originals(topics))[where(letter)]
        check_letter(letter, original, topics.topic)
        assert len(original.value or b"") == at_limit
        assert letter.header(constants.DLQ_TRUNCATED) is None
        assert await backlog(sqlite_url) == 0


@pytest.mark.kafka
class TestTooLargeDeadLetters:
    """A dead letter its topic or the producer cannot take is published cut to fit, and the outbox goes on."""

    async def test_letter_over_the_dead_letter_topic_limit_is_published_truncated(self, topics: TopicSet, sqlite_url: str) -> None:
        """The broker refuses it: it goes out cut, marked rc-dlq-truncated, before the next dead letter; later events count."""
        limit = 100_000
        small = dataclasses.replace(topics, dead_letter_topic=f"{topics.topic}.small-dlq")
        async with admin(small.kafka_settings()) as client:
            await client.create_topics([NewTopic(small.dead_letter_topic, 1, 1, topic_configs={"max.message.bytes": str(limit)})])
        key = b"big"
        before, after = events("before", key, 2), events("after", key, 5)
        await produce(topics.bootstrap, topics.topic, [*before, (key, b"x" * 300_000, ()), (key, b"{not json", ()), *after])

        with capture_logs() as logs:
            async with running(settings_for(small, sqlite_url), [message_count()]):
                await until(counted(sqlite_url, room_counts(before + after)), 60, "the valid events counted")
                await dead_letters(small, at_least=2, within=60)

        cut, whole = await dead_letters(small)
        stored = await originals(topics)
        check_cut(cut, stored[where(cut)], topics.topic, limit)
        check_letter(whole, stored[where(whole)], topics.topic)
        assert where(cut)[1] + 1 == where(whole)[1]  # in their order on the event topic
        assert whole.header(constants.DLQ_TRUNCATED) is None
        [logged] = [e for e in logs if e["event"] == "dead_letter_truncated"]
        assert (logged["topic"], logged["partition"], logged["offset"]) == (topics.topic, *where(cut))
        assert (logged["original_value_bytes"], logged["limit_bytes"]) == (300_000, limit)
        assert await backlog(sqlite_url) == 0

    async def test_letter_over_a_limit_lowered_while_running_is_published_truncated(self, topics: TopicSet, sqlite_url: str) -> None:
        """The broker refuses what the worker thought fits: it learns the new limit, cuts the letter, and the next one follows."""
        key, limit = b"lowered", 100_000
        first = events("first", key, 1)
        await produce(topics.bootstrap, topics.topic, [(key, b"{first", ()), *first])

        with capture_logs() as logs:
            async with running(settings_for(topics, sqlite_url), [message_count()]):
                await dead_letters(topics, at_least=1, within=60)  # the worker has read the old limit
                async with admin(topics.kafka_settings()) as client:
                    await client.alter_configs(
                        [ConfigResource(ConfigResourceType.TOPIC, topics.dead_letter_topic, configs={"max.message.bytes": str(limit)})]
                    )

                async def lowered() -> bool:
                    return await limit_of(topics.kafka_settings(), topics.dead_letter_topic) == limit

                await wait_until(lowered, 30, what="the broker to apply the new limit")
                after = events("after", key, 3)
                await produce(topics.bootstrap, topics.topic, [(key, b"x" * 300_000, ()), (key, b"{not json", ()), *after])
                await until(counted(sqlite_url, room_counts(first + after)), 60, "the valid events counted")
                await dead_letters(topics, at_least=3, within=60)

        _, cut, whole = await dead_letters(topics)
        stored = await originals(topics)
        check_cut(cut, stored[where(cut)], topics.topic, limit)
        check_letter(whole, stored[where(whole)], topics.topic)
        assert where(cut)[1] + 1 == where(whole)[1]
        assert [e["limit_bytes"] for e in logs if e["event"] == "dead_letter_truncated"] == [limit]
        assert [e for e in logs if e["event"] == "producer_renewed"]  # the refused batch's producer id was left behind
        assert await backlog(sqlite_url) == 0

    async def test_letter_over_the_producer_limit_is_published_truncated(self, topics: TopicSet, sqlite_url: str) -> None:
        """A record compressed on the event topic and far larger unpacked goes out cut to kafka.producer_max_request_bytes."""
        key = b"zip"
        await produce_one(topics.bootstrap, topics.topic, key, b" " * 3_000_000, compression="gzip")
        after = events("after", key, 3)
        await produce(topics.bootstrap, topics.topic, after)
        settings = settings_for(topics, sqlite_url)

        with capture_logs() as logs:
            async with running(settings, [message_count()]):
                await until(counted(sqlite_url, room_counts(after)), 60, "the valid events counted")
                await dead_letters(topics, at_least=1, within=60)

        [cut] = await dead_letters(topics)
        check_cut(cut, (await originals(topics))[where(cut)], topics.topic, settings.kafka.producer_max_request_bytes)
        [logged] = [e for e in logs if e["event"] == "dead_letter_truncated"]
        assert logged["limit_bytes"] == settings.kafka.producer_max_request_bytes
        assert await backlog(sqlite_url) == 0


def letter(value: bytes, own_headers: list[tuple[str, bytes]]) -> Outgoing:
    """A dead letter as the outbox sends it: the record's headers, then rc-dlq-* ones, then the outbox id."""
    ours = [
        (constants.DLQ_REASON, b"r" * 2000),
        (constants.DLQ_STAGE, b"decode"),
        (constants.DLQ_TOPIC, b"t"),
        (constants.DLQ_OFFSET, b"7"),
    ]
    return Outgoing("t.dlq", b"k", value, [*own_headers, *ours, (constants.OUTBOX_ID_HEADER, b"g:1")], 0)


class TestTruncate:
    """Cutting a dead letter to fit keeps what says what it is and where it came from."""

    def test_headers_too_large_to_keep_are_dropped_and_counted(self) -> None:
        """Own headers larger than the limit go, rc-* headers stay, the count is recorded, and the result fits."""
        own = [("big", b"h" * 60_000), ("bigger", b"h" * 70_000)]
        cut = truncate(letter(b"v" * 300_000, own), 100_000)
        assert cut is not None
        assert record_bytes(cut.key, cut.value, cut.headers) <= 100_000
        names = [name for name, _ in cut.headers]
        assert names[:5] == [
            constants.DLQ_REASON,
            constants.DLQ_STAGE,
            constants.DLQ_TOPIC,
            constants.DLQ_OFFSET,
            constants.OUTBOX_ID_HEADER,
        ]
        assert dict(cut.headers)[constants.DLQ_TRUNCATED] == b"300000"
        assert dict(cut.headers)[constants.DLQ_HEADERS_DROPPED] == b"2"
        assert 90_000 < len(cut.value) < 100_000
        assert set(cut.value) == {ord("v")}

    def test_letter_whose_own_rc_headers_do_not_fit_cannot_be_cut(self) -> None:
        """A limit below the size of the rc-dlq-* headers themselves leaves nothing that fits."""
        assert truncate(letter(b"v" * 10_000, []), 1_000) is None


class Verbose(App):
    """Answers every message with a reply of ``MAX_COMMAND_BYTES`` characters: one command too large."""

    runs = 0

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        Verbose.runs += 1
        creator = modify.get_creator()
        await creator.finish(creator.start_message().set_room(message.room).set_text("x" * constants.MAX_COMMAND_BYTES))


class TestCommandSize:
    """A command too large for the commands topic is the handler's error, caught when it is staged."""

    async def test_command_over_the_limit_is_refused_at_staging_and_dead_lettered_once(self) -> None:
        """finish() raises CommandTooLargeError: no retry, no command staged, the event dead-lettered for that app."""
        Verbose.runs = 0
        async with Harness(Verbose) as harness:
            await harness.deliver([message("hello", room="r1")], check=False)
            [dead] = await harness.dead_letters()
            assert await harness.commands() == []
        assert Verbose.runs == 1
        assert (dead.stage, dead.error_type) == ("handler", "CommandTooLargeError")
        assert f"over the limit of {constants.MAX_COMMAND_BYTES}" in dead.reason
