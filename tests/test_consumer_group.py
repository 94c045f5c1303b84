"""The walking skeleton end to end: `rc-worker run` processes in one group on a real broker.

Each test has its own topics and group (the `topics` fixture) and its own SQLite file, and
drives the worker only through its CLI, as an operator would.
"""

from __future__ import annotations

import base64
import json
import signal
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.support import (
    FIXTURES,
    StartWorker,
    TopicSet,
    WorkerProcess,
    counts,
    expected_counts,
    make_events,
    rc_worker,
    store_for,
    wait_until,
)
from worker import constants
from worker.errors import DecodeError
from worker.events import RawRecord, decode
from worker.kafka import admin, read_topic

pytestmark = pytest.mark.kafka


# -- helpers ---------------------------------------------------------------------------------


def log_tail(worker: WorkerProcess, lines: int = 30) -> str:
    """The end of a worker's log, for failure messages."""
    return "\n".join(worker.log_path.read_text(errors="replace").splitlines()[-lines:])


async def wait_for_counts(url: str, expected: Mapping[str, int], workers: list[WorkerProcess], within: float) -> None:
    """Wait until the message-count state equals ``expected``; fail at once if a worker dies."""
    last: dict[str, int] = {}

    async def caught_up() -> bool:
        nonlocal last
        for worker in workers:
            assert worker.alive(), f"{worker.log_path.name} exited early:\n{log_tail(worker)}"
        last = await counts(url)
        return last == expected

    try:
        await wait_until(caught_up, timeout=within, interval=0.5, what="counts to equal the expected totals")
    except AssertionError:
        total = last.get("misc:message-count")
        wrong = {k: (last.get(k), v) for k, v in expected.items() if last.get(k) != v}
        raise AssertionError(f"total {total} of {expected['misc:message-count']}; {len(wrong)} counters differ") from None


def stop_all(workers: list[WorkerProcess], timeout: float = 60) -> list[int]:
    """SIGTERM every worker at once (not one by one, which would rebalance), then wait for each."""
    for worker in workers:
        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
    return [worker.process.wait(timeout=timeout) for worker in workers if worker.process is not None]


def batches(worker: WorkerProcess) -> list[dict[str, Any]]:
    """The batch_committed log lines of a worker."""
    return worker.events("batch_committed")


async def end_offsets(topics: TopicSet) -> dict[int, int]:
    """The log-end offset of every partition of the event topic."""
    async with admin(topics.kafka_settings()) as client:
        described = await client.describe_topics([topics.topic])
    partitions = [TopicPartition(topics.topic, p["partition"]) for found in described for p in found["partitions"]]
    consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(partitions)
    finally:
        await consumer.stop()
    return {tp.partition: offset for tp, offset in ends.items()}


async def group_offsets(topics: TopicSet) -> dict[int, int]:
    """The consumer group's committed offset per partition (partitions never committed left out)."""
    async with admin(topics.kafka_settings()) as client:
        found = await client.list_consumer_group_offsets(topics.group_id)
    return {tp.partition: meta.offset for tp, meta in found.items() if tp.topic == topics.topic and meta.offset >= 0}


async def stored_offsets(url: str, topics: TopicSet) -> dict[int, int]:
    """The next offset per partition committed in the database with the state."""
    async with store_for(url) as store:
        return await store.stored_offsets(topics.group_id, topics.topic)


def nonempty(offsets: Mapping[int, int]) -> dict[int, int]:
    """Only the partitions holding records."""
    return {p: o for p, o in offsets.items() if o > 0}


def read_lines(*names: str) -> list[dict[str, Any]]:
    """Contract JSON-lines records from tests/fixtures."""
    lines = []
    for name in names:
        lines += [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]
    return lines


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    """Write contract JSON-lines records."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def expected_from(lines: list[dict[str, Any]]) -> dict[str, int]:
    """The counters of valid PostMessageSent records (decoded as the worker decodes them)."""
    rooms: Counter[str] = Counter()
    for line in lines:
        event = decode(as_record(line))
        assert event.message is not None
        rooms[f"room:{event.message.room.id}"] += 1
    return {"misc:message-count": sum(rooms.values()), **rooms}


def as_record(line: dict[str, Any]) -> RawRecord:
    """A contract line as the record Kafka would deliver."""
    value = base64.b64decode(line["value_b64"]) if "value_b64" in line else line["value"].encode()
    key = line["key"].encode() if line.get("key") is not None else None
    headers = tuple((k, v.encode()) for k, v in line.get("headers", {}).items())
    return RawRecord("t", 0, 0, 0, key, value, headers)


def prepare(topics: TopicSet, url: str, **extra: str) -> dict[str, str]:
    """The workers' environment, with the database schema created."""
    env = topics.env(url, **extra)
    rc_worker("db", "upgrade", env=env)
    return env


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.slow
class TestConsumerGroup:
    """Several worker processes share the topic's partitions and count exactly."""

    async def test_three_workers_count_20000_events_exactly(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """3 workers over 6 partitions count 20,000 events exactly, globally and per room, and each takes a share."""
        env = prepare(topics, sqlite_url)
        totals = make_events(tmp_path / "events.jsonl", count=20_000, rooms=50, seed=2)
        workers = [start_worker(env, f"worker-{n}") for n in range(3)]

        def balanced() -> bool:
            # The latest assignment of each member: all three hold partitions, together all six.
            latest = [w.events("partitions_assigned")[-1:] for w in workers]
            held = [set(found[0]["partitions"]) if found else set() for found in latest]
            return all(held) and sorted(p for h in held for p in h) == list(range(6))

        await wait_until(balanced, timeout=60, what="the group to spread 6 partitions over 3 workers")
        rc_worker("load", str(tmp_path / "events.jsonl"), env=env)

        await wait_for_counts(sqlite_url, expected_counts(totals), workers, within=150)

        assert stop_all(workers) == [0, 0, 0]
        assert all(w.events("worker_stopped") for w in workers)
        assert all(sum(b["processed"] for b in batches(w)) > 0 for w in workers)
        assert nonempty(await group_offsets(topics)) == nonempty(await end_offsets(topics))


class TestRestart:
    """A worker stopped and started again picks up where the group's committed offsets are."""

    async def test_restarted_worker_resumes_from_committed_offsets(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """After a restart only the records loaded since are processed, and the counts are exact."""
        env = prepare(topics, sqlite_url)
        first = make_events(tmp_path / "first.jsonl", count=1_000, rooms=20, seed=21)
        second = make_events(tmp_path / "second.jsonl", count=1_000, rooms=20, seed=22)

        rc_worker("load", str(tmp_path / "first.jsonl"), env=env)
        run1 = start_worker(env, "run1")
        await wait_for_counts(sqlite_url, expected_counts(first), [run1], within=60)
        assert run1.terminate() == 0
        after_first = nonempty(await end_offsets(topics))
        assert nonempty(await group_offsets(topics)) == after_first

        rc_worker("load", str(tmp_path / "second.jsonl"), env=env)
        run2 = start_worker(env, "run2")
        both = Counter(expected_counts(first)) + Counter(expected_counts(second))
        await wait_for_counts(sqlite_url, dict(both), [run2], within=60)
        assert run2.terminate() == 0

        resumed_at: dict[int, int] = {}
        for batch in batches(run2):
            partition = batch["partition"]
            resumed_at[partition] = min(resumed_at.get(partition, batch["first_offset"]), batch["first_offset"])
        assert {p: o for p, o in resumed_at.items() if p in after_first} == after_first
        assert sum(b["processed"] for b in batches(run2)) == second["events"]
        ends = nonempty(await end_offsets(topics))
        assert nonempty(await group_offsets(topics)) == ends
        assert await stored_offsets(sqlite_url, topics) == ends


@pytest.mark.slow
class TestShutdown:
    """SIGTERM while events flow: the worker finishes what it holds, commits, leaves, exits 0."""

    async def test_sigterm_drains_commits_and_exits_zero(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """SIGTERM mid-stream exits 0 with worker_stopped; a restart finishes with nothing lost or counted twice."""
        # Small batches, so the signal lands between many short units of work.
        env = prepare(topics, sqlite_url, RC_WORKER_KAFKA__MAX_BATCH_RECORDS="50")
        totals = make_events(tmp_path / "events.jsonl", count=4_000, rooms=20, seed=31)
        rc_worker("load", str(tmp_path / "events.jsonl"), env=env)

        run1 = start_worker(env, "run1")
        await wait_until(lambda: batches(run1) or not run1.alive(), timeout=60, what="a first committed batch")
        assert run1.terminate() == 0, log_tail(run1)
        assert run1.events("worker_stopped")

        # What the database holds was committed to Kafka before the worker left.
        stored = await stored_offsets(sqlite_url, topics)
        assert await group_offsets(topics) == stored
        async with store_for(sqlite_url) as store:
            marked = await store.processed_count("message-count")
        assert (await counts(sqlite_url)).get("misc:message-count", 0) == marked

        run2 = start_worker(env, "run2")
        await wait_for_counts(sqlite_url, expected_counts(totals), [run2], within=90)
        assert run2.terminate() == 0
        both = batches(run1) + batches(run2)
        assert sum(b["processed"] for b in both) == totals["events"]
        assert sum(b["duplicates"] for b in both) == 0


class TestDeadLetters:
    """Records that break the contract go to the dead-letter topic; the rest are counted."""

    async def test_invalid_records_land_in_dead_letter_topic_with_reason_and_value(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """Each invalid record is dead-lettered once, value byte for byte, with reason and origin headers."""
        env = prepare(topics, sqlite_url)
        invalid, valid = read_lines("invalid.jsonl"), read_lines("valid.jsonl")
        rc_worker("load", str(write_lines(tmp_path / "mixed.jsonl", invalid + valid)), env=env)

        worker = start_worker(env, "worker")
        await wait_for_counts(sqlite_url, expected_from(valid), [worker], within=60)

        settings = topics.kafka_settings()

        async def dead_letters() -> list[RawRecord]:
            found = [record async for record in read_topic(settings, topics.dead_letter_topic)]
            return found if len(found) >= len(invalid) else []

        letters = await wait_until(dead_letters, timeout=30, what="every invalid record in the dead-letter topic")
        assert worker.terminate() == 0
        originals = {(r.partition, r.offset): r async for r in read_topic(settings, topics.topic)}

        assert len(letters) == len(invalid)
        assert sorted(r.value or b"" for r in letters) == sorted(as_record(line).value or b"" for line in invalid)
        for letter in letters:
            assert letter.header(constants.DLQ_TOPIC) == topics.topic.encode()
            partition, offset = int(letter.header(constants.DLQ_PARTITION) or b"-1"), int(letter.header(constants.DLQ_OFFSET) or b"-1")
            original = originals[(partition, offset)]
            assert letter.value == original.value
            assert letter.key == original.key
            with pytest.raises(DecodeError) as refused:
                decode(original)
            assert letter.header(constants.DLQ_REASON) == refused.value.reason.encode()
            assert letter.header(constants.DLQ_STAGE) == b"decode"
            assert letter.header("content-type") == original.header("content-type")


def _other_events(template: dict[str, Any]) -> list[dict[str, Any]]:
    """Records a PostMessageSent worker must skip: other event types and system messages, both modes."""
    event = json.loads(template["value"])
    message = event["data"]
    key = template["key"]
    structured = {"content-type": constants.STRUCTURED_CONTENT_TYPE}

    def binary(ce_type: str, ce_id: str) -> dict[str, str]:
        return {
            "ce_specversion": "1.0",
            "ce_type": ce_type,
            "ce_source": event["source"],
            "ce_id": ce_id,
            "content-type": "application/json",
        }

    room_created = {**event, "type": "chat.rocket.room.created", "id": "other-1", "data": {"roomId": key}}
    system = {**event, "id": "system-1", "data": {**message, "id": "sys-msg-1", "type": "uj"}}
    return [
        {"key": key, "headers": structured, "value": json.dumps(room_created)},
        {"key": key, "headers": binary("chat.rocket.user.login", "other-2"), "value": json.dumps({"userId": "u1"})},
        {"key": key, "headers": structured, "value": json.dumps(system)},
        {
            "key": key,
            "headers": binary(constants.POST_MESSAGE_SENT, "system-2"),
            "value": json.dumps({**message, "id": "m2", "type": "ru"}),
        },
    ]


class TestSkipping:
    """Events that are not PostMessageSent are skipped and committed past."""

    async def test_other_types_and_system_messages_are_skipped_and_committed_past(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """Other types and system messages change no counter, go nowhere, and the offsets reach the end."""
        env = prepare(topics, sqlite_url)
        valid = read_lines("valid.jsonl")
        # Last in the rooms' partitions: only a worker that commits past them reaches the end.
        others = [other for room in ("r0000", "r0001", "r0002", "r0003") for other in _other_events({**valid[0], "key": room})]
        rc_worker("load", str(write_lines(tmp_path / "mixed.jsonl", valid + others)), env=env)
        ends = nonempty(await end_offsets(topics))

        worker = start_worker(env, "worker")

        async def at_end() -> bool:
            assert worker.alive(), log_tail(worker)
            return await group_offsets(topics) == ends

        await wait_until(at_end, timeout=60, what="committed offsets to reach the end of every partition")
        assert worker.terminate() == 0

        assert await counts(sqlite_url) == expected_from(valid)
        assert sum(b["skipped"] for b in batches(worker)) == len(others)
        assert [r async for r in read_topic(topics.kafka_settings(), topics.dead_letter_topic, idle_timeout_ms=500)] == []
