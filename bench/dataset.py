"""The benchmark's events: written by the contract generator, loaded once into a fresh topic.

Loading is not measured: large batches, many records in flight, and idempotent, so that a
retried send cannot put a record in twice. Where each record went (partition and offset) is
kept, so the counters a correct worker holds after stopping anywhere are known exactly; for
the whole topic they are checked against the generator's own totals.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from bench.services import Services
from handlers.mentions import mentioned_usernames
from worker.config import KafkaSettings
from worker.kafka import admin, create_topics, translate

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tests" / "fixtures" / "make_events.py"
TOTAL = "misc:message-count"
PARTITIONS = 6
# Every this many events one mentions a user (the mentions handler's work); message-count ignores it.
MENTION_EVERY = 3


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record of the dataset."""

    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


@dataclass(slots=True)
class Dataset:
    """Generated records, in file order, and the counters a correct worker ends with."""

    name: str
    records: list[Record]
    rooms: int
    expected: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


def expected_counters(records: list[Record]) -> dict[str, int]:
    """{"misc:message-count": n, "room:<id>": n, ...} for these records (keys are room ids)."""
    expected: dict[str, int] = {f"room:{key.decode()}": n for key, n in Counter(r.key for r in records).items()}
    expected[TOTAL] = len(records)
    return expected


def generate(workdir: Path, count: int, rooms: int, users: int, seed: int) -> Dataset:
    """Run the contract generator and parse its output; fails if its totals disagree with ours."""
    path = workdir / f"events-{count}-r{rooms}-s{seed}.jsonl"
    expect = path.with_suffix(".expect.json")
    args = [sys.executable, str(GENERATOR), "--count", str(count), "--rooms", str(rooms), "--users", str(users), "--seed", str(seed)]
    with path.open("wb") as out:
        subprocess.run([*args, "--expect", str(expect)], stdout=out, check=True, timeout=1800)
    records = [_with_mention(r, n, users) if n % MENTION_EVERY == 0 else r for n, r in enumerate(_parse(path))]
    path.unlink()  # the records live in memory now; the file is only the generator's output
    dataset = Dataset(path.stem, records, rooms, expected_counters(records))
    totals = orjson.loads(expect.read_bytes())
    from_generator = {TOTAL: totals["events"], **{f"room:{room}": n for room, n in totals["rooms"].items()}}
    if from_generator != dataset.expected:
        raise RuntimeError(f"{path}: the generator's expected totals differ from its records; is make_events.py changed?")
    return dataset


def _with_mention(record: Record, number: int, users: int) -> Record:
    """The record with a text that mentions one of the dataset's users (usernames are "user" + id)."""
    document = orjson.loads(record.value)
    message = document["data"]
    message["text"] = f"@useru{(number * 7) % users:04d} look: {message.get('text', '')}"
    return Record(record.key, orjson.dumps(document), record.headers)


def _parse(path: Path) -> Iterator[Record]:
    with path.open("rb") as lines:
        for line in lines:
            item = orjson.loads(line)
            headers = tuple((name, value.encode()) for name, value in item["headers"].items())
            yield Record(item["key"].encode(), item["value"].encode(), headers)


@dataclass(frozen=True, slots=True)
class Topic:
    """A topic of the benchmark's own, with the dead-letter and commands topics a worker needs."""

    bootstrap: str
    name: str

    def settings(self, group_id: str) -> KafkaSettings:
        """Kafka settings for a member of ``group_id`` on this topic: the one place its other topics are named."""
        return KafkaSettings(
            bootstrap_servers=self.bootstrap,
            topic=self.name,
            dead_letter_topic=f"{self.name}.dlq",
            commands_topic=f"{self.name}.cmd",
            group_id=group_id,
        )

    def names(self) -> tuple[str, str, str]:
        """The topic, its dead-letter topic and its commands topic."""
        kafka = self.settings("bench-unused")
        return kafka.topic, kafka.dead_letter_topic, kafka.commands_topic


# Every topic this run created, deleted at its end (a 200,000-event topic is over 100 MB).
created: list[Topic] = []


async def new_topic(services: Services, label: str) -> Topic:
    """Create a fresh 6-partition topic (and its dead-letter and commands topics)."""
    topic = Topic(services.kafka, f"bench-{label}-{uuid.uuid4().hex[:8]}")
    created.append(topic)
    await create_topics(topic.settings("bench-unused"), PARTITIONS)
    return topic


async def delete_created_topics() -> None:
    """Delete the topics :func:`new_topic` created in this run."""
    if not created:
        return
    async with admin(created[0].settings("bench-unused")) as client:
        existing = set(await client.list_topics())
        names = [name for t in created for name in t.names() if name in existing]
        if names:
            with translate("deleting the benchmark's topics"):
                await client.delete_topics(names)
    created.clear()


def producer(bootstrap: str, *, linger_ms: int, enable_idempotence: bool = False) -> AIOKafkaProducer:
    """A producer tuned for throughput (loading) or, with a small linger, for latency."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all" if enable_idempotence else 1,
        enable_idempotence=enable_idempotence,
        linger_ms=linger_ms,
        max_batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
        request_timeout_ms=60_000,
    )


@dataclass(slots=True)
class Layout:
    """Where the loaded records went: per partition, the room key at each offset from 0.

    A worker commits its counters with the next offset of each partition, so the counters a
    correct worker holds after any stop are those of the records below its stored offsets.
    """

    keys: dict[int, list[bytes]]
    # The values at each offset, kept when a scenario checks more than the counters.
    values: dict[int, list[bytes]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """How many records were loaded."""
        return sum(len(keys) for keys in self.keys.values())

    def ends(self) -> dict[int, int]:
        """The next offset of each partition after the load."""
        return {partition: len(keys) for partition, keys in self.keys.items()}

    def expected(self, upto: dict[int, int] | None = None) -> dict[str, int]:
        """The counters of the records below ``upto`` (per partition; None: all of them)."""
        rooms: Counter[bytes] = Counter()
        for partition, keys in self.keys.items():
            rooms.update(keys if upto is None else keys[: upto.get(partition, 0)])
        expected = {f"room:{key.decode()}": n for key, n in rooms.items()}
        expected[TOTAL] = sum(rooms.values())
        return expected

    def expected_mentions(self, upto: dict[int, int] | None = None) -> dict[tuple[str, str], int]:
        """{(username, room id): unread mentions} the mentions handler (default settings) leaves.

        Replayed in offset order per partition, as a room's events all go to one partition:
        a sender's post resets their own record for the room, then each mention adds one.
        """
        state: dict[tuple[str, str], int] = {}
        for partition, values in self.values.items():
            for value in values if upto is None else values[: upto.get(partition, 0)]:
                message = orjson.loads(value)["data"]
                room, sender = message["room"]["id"], message["sender"].get("username")
                if sender:
                    state.pop((sender, room), None)
                for name in mentioned_usernames(message.get("text") or "", sender=sender, ignored=["all", "here"], limit=20):
                    state[(name, room)] = state.get((name, room), 0) + 1
        return state

    @classmethod
    def of(cls, placed: list[tuple[int, int, bytes]], values: list[bytes] | None = None) -> Layout:
        """From (partition, offset, key) of every record; offsets must run from 0 without gaps.

        ``values``: each record's value, in the order of ``placed``, kept for the mentions check.
        """
        keys: dict[int, list[bytes]] = {}
        kept: dict[int, list[bytes]] = {}
        indexed = sorted((p, o, k, i) for i, (p, o, k) in enumerate(placed))
        for partition, offset, key, index in indexed:
            found = keys.setdefault(partition, [])
            if offset != len(found):
                raise RuntimeError(f"partition {partition}: offset {offset} where {len(found)} was expected; is the topic fresh?")
            found.append(key)
            if values is not None:
                kept.setdefault(partition, []).append(values[index])
        return cls(keys, kept)


async def load(topic: Topic, records: list[Record], *, keep_values: bool = False) -> Layout:
    """Produce ``records`` keyed by room, in order within each partition; returns where each went.

    Records go to the partition Kafka's default partitioner picks for their key, as a plain
    send would, but in whole batches: loading 200,000 records one send at a time takes longer
    than several scenarios.
    """
    # Idempotent, so that a retried batch cannot put records in twice.
    client = producer(topic.bootstrap, linger_ms=50, enable_idempotence=True)
    await client.start()
    try:
        partitions = sorted(await client.partitions_for(topic.name))
        choose = DefaultPartitioner()
        by_partition: dict[int, list[Record]] = {}
        for record in records:
            by_partition.setdefault(choose(record.key, partitions, partitions), []).append(record)
        sent: list[tuple[int, list[bytes], asyncio.Future[Any]]] = []
        for partition, found in by_partition.items():
            batch, keys = client.create_batch(), list[bytes]()
            for record in found:
                if batch.append(key=record.key, value=record.value, timestamp=None, headers=list(record.headers)) is None:
                    sent.append((partition, keys, await client.send_batch(batch, topic.name, partition=partition)))
                    batch, keys = client.create_batch(), list[bytes]()
                    batch.append(key=record.key, value=record.value, timestamp=None, headers=list(record.headers))
                keys.append(record.key)
            sent.append((partition, keys, await client.send_batch(batch, topic.name, partition=partition)))
        bases = await asyncio.gather(*(future for _, _, future in sent))
    finally:
        await client.stop()
    placed = [(p, meta.offset + i, key) for (p, keys, _), meta in zip(sent, bases, strict=True) for i, key in enumerate(keys)]
    if not keep_values:
        return Layout.of(placed)
    values = [record.value for found in by_partition.values() for record in found]
    return Layout.of(placed, values)
