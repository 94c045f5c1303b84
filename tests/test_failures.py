"""One test per failure the worker must survive, against the real broker and databases.

Invalid records, handler errors, hangs and timeouts run an in-process Worker with test apps
(fast, and the apps can be steered from the test); outages, fencing and SIGTERM run
`rc-worker run` subprocesses, whose JSON logs say what the worker did. Outages use a broker
and a PostgreSQL cluster of the session's own (tests/services.py): the shared ones never go
down.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import sqlite3
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka import AIOKafkaProducer
from sqlalchemy import select

from handlers.message_count import MessageCount
from tests.services import OwnKafka, OwnPostgres
from tests.support import (
    FIXTURES,
    TopicSet,
    WorkerProcess,
    counts,
    create_postgres_database,
    store_for,
    wait_until,
    write_distribution,
)
from worker import Association, AssociationModel, IHttp, IModify, IPersistence, IRead, constants, testing
from worker.apps.contract import App
from worker.config import HandlerSettings, ObservabilitySettings, PersistenceSettings, ProcessingSettings, Settings
from worker.errors import DeadLetterNow, DecodeError
from worker.events import Message, RawRecord, decode
from worker.kafka import Reader, admin, create_topics, read_topic
from worker.persistence.schema import partition_offsets
from worker.pipeline.runner import Worker
from worker.plugins import instantiate

pytestmark = pytest.mark.kafka

# -- events and topics ---------------------------------------------------------------------------


def event_value(event_id: str, room: str, text: str = "hello") -> bytes:
    """A structured-mode PostMessageSent whose message id is the event id."""
    return json.dumps(
        {
            "specversion": "1.0",
            "type": constants.POST_MESSAGE_SENT,
            "source": "//failures.test",
            "id": event_id,
            "time": "2026-11-29T10:00:00Z",
            "datacontenttype": "application/json",
            "data": {
                "id": event_id,
                "room": {"id": room},
                "sender": {"id": "u1"},
                "text": text,
                "createdAt": "2026-11-29T10:00:00Z",
            },
        }
    ).encode()


STRUCTURED = (("content-type", constants.STRUCTURED_CONTENT_TYPE.encode()),)


@dataclass(frozen=True)
class Sent:
    """A produced record and where it landed."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    partition: int
    offset: int


async def produce(
    bootstrap: str, topic: str, records: Sequence[tuple[bytes | None, bytes | None, Sequence[tuple[str, Any]]]]
) -> list[Sent]:
    """Produce records in order; returns where each one landed."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_request_size=4_000_000)
    await producer.start()
    try:
        sent = []
        for key, value, headers in records:
            meta = await producer.send_and_wait(topic, value=value, key=key, headers=list(headers))
            sent.append(Sent(key, value, tuple(headers), meta.partition, meta.offset))
    finally:
        await producer.stop()
    return sent


def valid_events(count: int, rooms: int, prefix: str) -> list[tuple[bytes, bytes, tuple[tuple[str, bytes], ...]]]:
    """``count`` PostMessageSent records over ``rooms`` rooms, keyed by room."""
    return [(f"r{n % rooms:03d}".encode(), event_value(f"{prefix}-{n}", f"r{n % rooms:03d}"), STRUCTURED) for n in range(count)]


def room_counts(records: Sequence[tuple[bytes | None, bytes | None, Any]]) -> dict[str, int]:
    """The message-count counters the valid records among ``records`` produce."""
    rooms: Counter[str] = Counter()
    for key, value, headers in records:
        try:
            event = decode(RawRecord("t", 0, 0, 0, key, value, tuple(headers)))
        except DecodeError:
            continue
        if event.message is not None:
            rooms[f"room:{event.message.room.id}"] += 1
    return {"misc:message-count": sum(rooms.values()), **rooms}


async def dead_letters(topics: TopicSet, at_least: int = 0, within: float = 30) -> list[RawRecord]:
    """The dead-letter topic's records, once there are ``at_least`` of them."""

    async def found() -> list[RawRecord] | None:
        records = [r async for r in read_topic(topics.kafka_settings(), topics.dead_letter_topic, idle_timeout_ms=500)]
        return records if len(records) >= at_least else None

    if at_least == 0:
        return await found() or []
    result: list[RawRecord] = await wait_until(found, timeout=within, what=f"{at_least} dead letters")
    return result


async def end_offsets(topics: TopicSet) -> dict[int, int]:
    """The log-end offset of each partition of the event topic."""
    async with Reader(topics.kafka_settings()) as reader:
        ends = await reader.end_offsets({(topics.topic, p) for p in range(6)})
    return {p: o for (_, p), o in ends.items()}


async def group_offsets(topics: TopicSet) -> dict[int, int]:
    """The group's committed offset per partition that has one."""
    async with admin(topics.kafka_settings()) as client:
        found = await client.list_consumer_group_offsets(topics.group_id)
    return {tp.partition: meta.offset for tp, meta in found.items() if tp.topic == topics.topic and meta.offset >= 0}


async def stored_offsets(url: str, topics: TopicSet) -> dict[int, int]:
    """The next offset per partition that the database holds with the state."""
    async with store_for(url) as store:
        return await store.stored_offsets(topics.group_id, topics.topic)


async def generations(url: str, topics: TopicSet) -> dict[int, int]:
    """How many times each partition was claimed (one per assignment to a worker)."""
    async with store_for(url) as store, store.engine.connect() as conn:
        rows = await conn.execute(
            select(partition_offsets.c.partition, partition_offsets.c.generation).where(partition_offsets.c.group_id == topics.group_id)
        )
        return {row.partition: row.generation for row in rows}


def nonempty(offsets: Mapping[int, int]) -> dict[int, int]:
    """Only the partitions holding records."""
    return {p: o for p, o in offsets.items() if o > 0}


# -- an in-process worker with test apps ---------------------------------------------------------


class Flaky(App):
    """Raises ``error`` for the messages in ``fail``; counts every run per message id."""

    def __init__(self, fail: set[str], error: Callable[[str], Exception]) -> None:
        self.fail = fail
        self.error = error
        self.runs: Counter[str] = Counter()

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        self.runs[message.id] += 1
        if message.id in self.fail:
            raise self.error(message.id)


class Hanging(App):
    """Never returns for the messages in ``hang``; counts every run per message id."""

    def __init__(self, hang: set[str]) -> None:
        self.hang = hang
        self.runs: Counter[str] = Counter()

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        self.runs[message.id] += 1
        if message.id in self.hang:
            await asyncio.Event().wait()


class Gated(App):
    """Fails ``target`` on every run; its second run first waits until the test opens the gate."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.retrying = asyncio.Event()
        self.gate = asyncio.Event()
        self.runs: Counter[str] = Counter()

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        self.runs[message.id] += 1
        if message.id != self.target:
            return
        if self.runs[message.id] == 2:
            self.retrying.set()
            await self.gate.wait()
        raise RuntimeError(f"cannot handle {message.id} yet")


class Slow(App):
    """Takes ``seconds`` over the messages in ``slow``; ``started`` is set when it first does."""

    def __init__(self, slow: set[str], seconds: float) -> None:
        self.slow = slow
        self.seconds = seconds
        self.started = asyncio.Event()

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        if message.id in self.slow:
            self.started.set()
            await asyncio.sleep(self.seconds)


def bound(app: App, app_id: str) -> App:
    """``app`` with its id, as the runtime binds plugins."""
    app.bind(app_id, {})
    return app


def message_count() -> App:
    """The built-in counter, as a plugin loader would create it."""
    return instantiate(MessageCount, "message-count", {})


def settings_for(topics: TopicSet, url: str, kafka: Mapping[str, Any] | None = None, **processing: Any) -> Settings:
    """Settings for an in-process worker on ``topics`` and ``url``."""
    return Settings(
        kafka=topics.kafka_settings(session_timeout_ms=6000, heartbeat_interval_ms=1000, fetch_timeout_ms=200).model_copy(
            update=dict(kafka or {})
        ),
        persistence=PersistenceSettings(url=url),  # type: ignore[arg-type]
        processing=ProcessingSettings(**{"backoff_initial_ms": 20, "backoff_max_ms": 200, **processing}),
        handlers=HandlerSettings(enabled=()),
        observability=ObservabilitySettings(enabled=False),
    )


_workers: list[asyncio.Task[None]] = []


@contextlib.asynccontextmanager
async def running(settings: Settings, apps: list[App]) -> AsyncIterator[Worker]:
    """A Worker running in this event loop; stopped (and its errors raised) at the end."""
    async with store_for(settings.persistence.url.get_secret_value()):
        pass  # the schema, migrated
    worker = Worker(settings, apps)
    task = asyncio.create_task(worker.run(), name="worker")
    _workers.append(task)
    try:
        yield worker
    finally:
        _workers.remove(task)
        worker.stop()
        async with asyncio.timeout(90):
            await task


async def until(predicate: Callable[[], Any], within: float, what: str) -> Any:
    """wait_until, failing at once if an in-process worker has died."""

    async def check() -> Any:
        for task in _workers:
            if task.done():
                raise AssertionError(f"the worker stopped while waiting for {what}") from task.exception()
        found = predicate()
        return await found if asyncio.iscoroutine(found) else found

    return await wait_until(check, timeout=within, interval=0.3, what=what)


def counted(url: str, expected: Mapping[str, int]) -> Callable[[], Any]:
    """A predicate: message-count's counters equal ``expected``."""

    async def check() -> bool:
        return await counts(url) == expected

    return check


async def originals(topics: TopicSet) -> dict[tuple[int, int], RawRecord]:
    """The event topic's records by (partition, offset), as the broker stored them."""
    return {(r.partition, r.offset): r async for r in read_topic(topics.kafka_settings(), topics.topic)}


def check_letter(letter: RawRecord, original: RawRecord, topic: str) -> None:
    """A dead letter keeps the original's key, value and headers, and names where it came from."""
    assert letter.value == (original.value or b"")
    assert letter.key == original.key
    assert letter.headers[: len(original.headers)] == original.headers
    assert letter.header(constants.DLQ_TOPIC) == topic.encode()
    assert letter.header(constants.DLQ_PARTITION) == str(original.partition).encode()
    assert letter.header(constants.DLQ_OFFSET) == str(original.offset).encode()
    assert letter.header(constants.DLQ_TIMESTAMP) == str(original.timestamp_ms).encode()


# -- invalid records ------------------------------------------------------------------------------


def _fixture_lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


def _line_record(line: dict[str, Any], key: bytes) -> tuple[bytes, bytes, tuple[tuple[str, bytes], ...]]:
    value = base64.b64decode(line["value_b64"]) if "value_b64" in line else line["value"].encode()
    return key, value, tuple((k, v.encode()) for k, v in line["headers"].items())


class TestInvalidRecords:
    """Records that are not the contract go to the dead-letter topic once; the partition goes on."""

    async def test_every_invalid_record_is_dead_lettered_once_and_the_partition_goes_on(self, topics: TopicSet, sqlite_url: str) -> None:
        """Each contract class and worse lands once in the DLQ, value byte for byte, with reason and origin; later events count."""
        key = b"poison"  # one partition: the valid events after the poison must still be counted
        invalid = [_line_record(line, key) for line in _fixture_lines("invalid.jsonl")]
        invalid += [
            (key, None, ()),  # a tombstone
            (key, b"{not json", (("trace", None),)),  # a header without a value
            (key, event_value("binary-no-id", "r1"), (("ce_specversion", b"1.0"), ("ce_type", b"x"), ("ce_source", b"//s"))),
            (key, event_value("plain-text", "r1"), (("content-type", b"text/plain"),)),
        ]
        valid = [(key, event_value(f"after-{n}", f"r{n % 3}"), STRUCTURED) for n in range(20)]
        sent = await produce(topics.bootstrap, topics.topic, invalid + valid)

        async with running(settings_for(topics, sqlite_url), [message_count()]):
            await until(counted(sqlite_url, room_counts(valid)), 60, "the valid events counted")
            await dead_letters(topics, at_least=len(invalid))

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        assert len(letters) == len(invalid)
        stored = await originals(topics)
        positions = [
            (int(letter.header(constants.DLQ_PARTITION) or -1), int(letter.header(constants.DLQ_OFFSET) or -1)) for letter in letters
        ]
        assert sorted(positions) == sorted((s.partition, s.offset) for s in sent[: len(invalid)])
        for letter, position in zip(letters, positions, strict=True):
            original = stored[position]
            check_letter(letter, original, topics.topic)
            assert letter.header(constants.DLQ_STAGE) == b"decode"
            with pytest.raises(DecodeError) as refused:
                decode(original)
            assert letter.header(constants.DLQ_REASON) == refused.value.reason.encode()
        assert await counts(sqlite_url) == room_counts(valid)
        assert nonempty(await group_offsets(topics)) == nonempty(await end_offsets(topics))


# -- handler errors -------------------------------------------------------------------------------


class ConflictedFailure(App):
    """Reads an association, meets a concurrent commit to it on its first run per event, and always raises."""

    RUNS: ClassVar[Counter[str]] = Counter()
    DB_PATH: ClassVar[Path]

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        await read.get_persistence_reader().read_by_association(COUNTED)
        self.RUNS[message.id] += 1
        if self.RUNS[message.id] == 1:
            await asyncio.to_thread(_bump_version, self.DB_PATH, self.id, f"as:{COUNTED}")
        raise RuntimeError("always fails")


COUNTED = Association(AssociationModel.MISC, "counted")


def _bump_version(path: Path, app_id: str, key: str) -> None:
    """What another worker's commit does to a key this run has read."""
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as conn, conn:
        conn.execute(
            "INSERT INTO key_versions (app_id, key, version) VALUES (?, ?, 1) "
            "ON CONFLICT (app_id, key) DO UPDATE SET version = version + 1",
            (app_id, key),
        )


class TestHandlerAttemptsAcrossConflicts:
    async def test_a_batch_run_again_after_a_conflict_does_not_run_a_failing_handler_again(self, tmp_path: Path) -> None:
        """handler_max_attempts bounds a handler's runs per event across every run of its batch, conflicts included."""
        ConflictedFailure.RUNS.clear()
        ConflictedFailure.DB_PATH = tmp_path / "state.db"
        async with testing.Harness(ConflictedFailure, app_id="conflicted", directory=tmp_path) as harness:
            delivery = await harness.deliver([testing.message("a"), testing.message("b")], batch_size=2, check=False)
            dead_letters = await harness.dead_letters()
        assert delivery.conflicts >= 1
        assert sorted(ConflictedFailure.RUNS.values()) == [3, 3]  # TEST_PROCESSING: handler_max_attempts=3
        assert len(dead_letters) == 2


class TestHandlerErrors:
    """A handler that fails is retried, then dead-lettered for that app alone; the partition goes on."""

    async def test_failing_handler_is_retried_then_dead_lettered_while_other_apps_count_the_event(
        self, topics: TopicSet, sqlite_url: str
    ) -> None:
        """handler_max_attempts runs, then one dead letter naming app, error type and message; message-count counts it all."""
        # One room, so one partition: no other lane's commit can make this batch conflict and
        # run again (which would run the failing handler again from its first attempt).
        records = valid_events(40, rooms=1, prefix="he")
        sent = await produce(topics.bootstrap, topics.topic, records)
        broken = "he-7"
        flaky = Flaky({broken}, lambda mid: ValueError(f"no luck with {mid}"))
        apps = [bound(flaky, "flaky"), message_count()]

        async with running(settings_for(topics, sqlite_url, handler_max_attempts=4), apps):
            await dead_letters(topics, at_least=1)
            await until(counted(sqlite_url, room_counts(records)), 60, "every event counted")

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        assert len(letters) == 1
        letter = letters[0]
        assert flaky.runs[broken] == 4
        assert {mid: n for mid, n in flaky.runs.items() if mid != broken} == {f"he-{n}": 1 for n in range(40) if n != 7}
        where = next((s.partition, s.offset) for s in sent if s.value == event_value(broken, "r000"))
        check_letter(letter, (await originals(topics))[where], topics.topic)
        assert letter.header(constants.DLQ_STAGE) == b"handler"
        assert letter.header(constants.DLQ_APP) == b"flaky"
        assert letter.header(constants.DLQ_ERROR_TYPE) == b"ValueError"
        assert b"no luck with he-7" in (letter.header(constants.DLQ_REASON) or b"")
        assert nonempty(await group_offsets(topics)) == nonempty(await end_offsets(topics))

    async def test_dead_letter_now_skips_the_retries(self, topics: TopicSet, sqlite_url: str) -> None:
        """A handler raising DeadLetterNow runs once; its event is dead-lettered at once with that error type."""
        records = valid_events(10, rooms=1, prefix="dln")
        await produce(topics.bootstrap, topics.topic, records)
        refusing = Flaky({"dln-4"}, lambda mid: DeadLetterNow(f"{mid} can never be handled"))

        async with running(settings_for(topics, sqlite_url, handler_max_attempts=5), [bound(refusing, "refusing"), message_count()]):
            await dead_letters(topics, at_least=1)
            await until(counted(sqlite_url, room_counts(records)), 60, "every event counted")

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        assert refusing.runs["dln-4"] == 1
        assert [(r.header(constants.DLQ_APP), r.header(constants.DLQ_ERROR_TYPE)) for r in letters] == [(b"refusing", b"DeadLetterNow")]
        assert b"dln-4 can never be handled" in (letters[0].header(constants.DLQ_REASON) or b"")

    async def test_hanging_handler_is_cut_off_by_the_timeout_and_dead_lettered(self, topics: TopicSet, sqlite_url: str) -> None:
        """A run longer than handler_timeout_s is cancelled, retried, then dead-lettered as a TimeoutError; the rest counts."""
        records = valid_events(12, rooms=1, prefix="hang")
        await produce(topics.bootstrap, topics.topic, records)
        hanging = Hanging({"hang-5"})

        settings = settings_for(topics, sqlite_url, handler_max_attempts=2, handler_timeout_s=0.5)
        async with running(settings, [bound(hanging, "hanging"), message_count()]):
            await dead_letters(topics, at_least=1, within=60)
            await until(counted(sqlite_url, room_counts(records)), 60, "every event counted")

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        assert hanging.runs["hang-5"] == 2
        assert [(r.header(constants.DLQ_APP), r.header(constants.DLQ_ERROR_TYPE)) for r in letters] == [(b"hanging", b"TimeoutError")]

    async def test_retrying_partition_does_not_block_the_others(self, topics: TopicSet, sqlite_url: str) -> None:
        """While one partition's handler is between retries, every other partition's events are committed."""
        records = valid_events(60, rooms=12, prefix="iso")
        sent = await produce(topics.bootstrap, topics.topic, records)
        target = "iso-13"
        stuck = next(s.partition for s in sent if s.value == event_value(target, "r001"))
        others = [r for r, s in zip(records, sent, strict=True) if s.partition != stuck]
        assert others, "the rooms must spread over more than one partition"
        gated = Gated(target)

        async with running(settings_for(topics, sqlite_url, handler_max_attempts=3), [bound(gated, "gated"), message_count()]):
            await until(gated.retrying.is_set, 60, "the handler's second attempt")
            expected_others = {k: v for k, v in room_counts(others).items() if k != "misc:message-count"}

            async def others_committed() -> bool:
                found = await counts(sqlite_url)
                return all(found.get(room) == n for room, n in expected_others.items())

            await until(others_committed, 60, "the other partitions' events committed")
            ends = await end_offsets(topics)

            async def others_at_end() -> bool:
                committed = await group_offsets(topics)
                return all(committed.get(p) == o for p, o in nonempty(ends).items() if p != stuck)

            await until(others_at_end, 30, "the other partitions' offsets committed to Kafka")
            assert (await group_offsets(topics)).get(stuck, 0) < ends[stuck]
            assert gated.runs[target] == 2
            gated.gate.set()
            await dead_letters(topics, at_least=1)
            await until(counted(sqlite_url, room_counts(records)), 60, "every event counted")

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        # (Its batch ran again after a version conflict with the others: the dead letter is still one.)
        assert [r.header(constants.DLQ_APP) for r in letters] == [b"gated"]

    async def test_long_handler_does_not_exceed_the_poll_interval(self, topics: TopicSet, sqlite_url: str) -> None:
        """A handler running longer than max.poll.interval.ms causes no rebalance: each partition is claimed once."""
        records = valid_events(12, rooms=6, prefix="long")
        await produce(topics.bootstrap, topics.topic, records)
        slow = Slow({"long-2", "long-9"}, seconds=4.0)
        settings = settings_for(topics, sqlite_url, kafka={"max_poll_interval_ms": 1500})

        async with running(settings, [bound(slow, "slow"), message_count()]):
            await until(counted(sqlite_url, room_counts(records)), 90, "every event counted")

        assert set((await generations(sqlite_url, topics)).values()) == {1}


# -- subprocess workers with a test plugin ---------------------------------------------------------

SLEEPY = '''
"""A test plugin: sleeps over messages with a given text, and says so in a marker file."""

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

from worker import App


class SleepySettings(BaseModel):
    seconds: float = 0.0
    text: str = "slow"
    marker: str = ""
    once: bool = False


class Sleepy(App):
    settings_model = SleepySettings

    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        if message.text != self.settings["text"]:
            return
        marker = Path(self.settings["marker"]) if self.settings["marker"] else None
        if marker is not None:
            if self.settings["once"] and marker.exists():
                return
            marker.write_text(str(os.getpid()))
        await asyncio.sleep(self.settings["seconds"])
'''


@dataclass
class Plugged:
    """What a subprocess test needs: the workers' environment and the marker the plugin writes."""

    env: dict[str, str]
    marker: Path


async def plugged(tmp_path: Path, env: Mapping[str, str], *, seconds: float, once: bool = False, **extra: str) -> Plugged:
    """``env`` with the sleepy test plugin installed (on PYTHONPATH) and enabled after message-count; the schema made."""
    async with store_for(env["RC_WORKER_PERSISTENCE__URL"]):
        pass
    site = write_distribution(tmp_path / "site", "rc-test-sleepy", {"sleepy": "rc_test_sleepy:Sleepy"}, {"rc_test_sleepy": SLEEPY})
    marker = tmp_path / "slow-run-started"
    settings = {"sleepy": {"seconds": seconds, "marker": str(marker), "once": once}}
    full = {
        **env,
        "PYTHONPATH": str(site),
        "RC_WORKER_HANDLERS__ENABLED": '["message-count", "sleepy"]',
        "RC_WORKER_HANDLERS__SETTINGS": json.dumps(settings),
        **extra,
    }
    return Plugged(full, marker)


def log_tail(worker: WorkerProcess, lines: int = 40) -> str:
    """The end of a worker's log, for failure messages."""
    return "\n".join(worker.log_path.read_text(errors="replace").splitlines()[-lines:])


def covering(worker: WorkerProcess, partition: int, offset: int) -> list[dict[str, Any]]:
    """The worker's committed batches of ``partition`` that include ``offset``."""
    return [b for b in worker.events("batch_committed") if b["partition"] == partition and b["first_offset"] <= offset < b["next_offset"]]


class TestShutdown:
    """SIGTERM: the batch in flight is finished, or cut off once processing.shutdown_timeout_s is spent."""

    async def test_sigterm_with_a_hanging_handler_stops_hard_within_the_shutdown_timeout(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: Callable[[Mapping[str, str], str], WorkerProcess]
    ) -> None:
        """A handler that never returns does not hold the worker: it stops after shutdown_timeout_s, exit status 1."""
        setup = await plugged(
            tmp_path,
            topics.env(sqlite_url),
            seconds=3600,
            RC_WORKER_PROCESSING__HANDLER_TIMEOUT_S="3600",
            RC_WORKER_PROCESSING__SHUTDOWN_TIMEOUT_S="3",
        )
        await produce(topics.bootstrap, topics.topic, [(b"r1", event_value("sd-1", "r1", "slow"), STRUCTURED)])
        worker = start_worker(setup.env, "worker")
        await wait_until(lambda: setup.marker.exists() or not worker.alive(), timeout=60, what="the handler to start hanging")
        assert worker.alive(), log_tail(worker)

        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        # The bound: without the shutdown timeout this would wait out the handler's hour.
        status = worker.process.wait(timeout=3 + 40)

        assert status == 1
        assert worker.events("worker_stopping")
        assert "stopped hard" in worker.log_path.read_text()

    async def test_sigterm_with_a_slow_handler_finishes_the_batch_and_exits_zero(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: Callable[[Mapping[str, str], str], WorkerProcess]
    ) -> None:
        """A handler that finishes within shutdown_timeout_s has its batch committed, in the database and in Kafka; exit 0."""
        setup = await plugged(tmp_path, topics.env(sqlite_url), seconds=3)
        records = valid_events(20, rooms=3, prefix="sd2")
        slow = (b"r000", event_value("sd2-slow", "r000", "slow"), STRUCTURED)
        sent = await produce(topics.bootstrap, topics.topic, [*records, slow])
        where = sent[-1]
        worker = start_worker(setup.env, "worker")
        await wait_until(lambda: setup.marker.exists() or not worker.alive(), timeout=60, what="the slow handler to start")

        status = worker.terminate(timeout=60)

        assert status == 0, log_tail(worker)
        assert covering(worker, where.partition, where.offset), log_tail(worker)
        assert (await group_offsets(topics)).get(where.partition, 0) > where.offset
        assert worker.events("worker_stopped")


class TestRebalance:
    """A worker that lost a partition never commits for it afterwards; a slow revoke is not a storm."""

    async def test_revoke_waiting_for_a_slow_batch_does_not_start_a_rebalance_storm(self, topics: TopicSet, sqlite_url: str) -> None:
        """A member finishing a batch longer than the session timeout on revoke commits it and stays in the group."""
        records = valid_events(36, rooms=6, prefix="storm")
        await produce(topics.bootstrap, topics.topic, records)
        # Longer than the session (6 s), which aiokafka takes as the rebalance timeout unless told.
        first_slow = Slow({"storm-0"}, seconds=9.0)
        settings = settings_for(topics, sqlite_url, shutdown_timeout_s=30)

        async with running(settings, [bound(first_slow, "slow"), message_count()]):
            await until(first_slow.started.is_set, 60, "the first worker's slow batch")
            # A second member joins: the first must revoke, and first finish its 9 s batch.
            second = Flaky(set(), RuntimeError)
            async with running(settings, [bound(second, "slow"), message_count()]):
                await until(counted(sqlite_url, room_counts(records)), 90, "every event counted")
                claims = await generations(sqlite_url, topics)

        # Had the first been dropped from the group for rejoining late, its batch would have
        # been fenced off, run again by the second, and its rejoining started another round.
        assert "storm-0" not in second.runs
        assert max(claims.values()) <= 2, claims

    async def test_fenced_worker_never_commits_for_the_partition_it_lost(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: Callable[[Mapping[str, str], str], WorkerProcess]
    ) -> None:
        """Claimed away mid-batch, the worker's commit is refused (partition_fenced); the next owner counts every event once."""
        setup = await plugged(tmp_path, topics.env(sqlite_url), seconds=4, once=True)
        records = valid_events(30, rooms=3, prefix="fence")
        slow = (b"r001", event_value("fence-slow", "r001", "slow"), STRUCTURED)
        sent = await produce(topics.bootstrap, topics.topic, [*records, slow])
        where = sent[-1]
        first = start_worker(setup.env, "first")
        await wait_until(lambda: setup.marker.exists() or not first.alive(), timeout=60, what="the slow handler to start")

        # Another owner claims the partition while the first worker's batch is in flight.
        async with store_for(sqlite_url) as store:
            await store.claim(topics.group_id, topics.topic, [where.partition], "the-test")
        await wait_until(lambda: first.events("partition_fenced") or not first.alive(), timeout=60, what="partition_fenced")
        assert first.terminate() == 0, log_tail(first)

        second = start_worker(setup.env, "second")
        await wait_until(counted(sqlite_url, room_counts([*records, slow])), timeout=90, what="every event counted")
        assert second.terminate() == 0, log_tail(second)

        assert [e["partition"] for e in first.events("partition_fenced")] == [where.partition]
        assert not covering(first, where.partition, where.offset)
        assert covering(second, where.partition, where.offset)
        processed = sum(b["processed"] for w in (first, second) for b in w.events("batch_committed"))
        assert processed == len(records) + 1
        assert nonempty(await group_offsets(topics)) == nonempty(await end_offsets(topics))


# -- outages ------------------------------------------------------------------------------------------


async def own_topics(broker: OwnKafka) -> TopicSet:
    """A fresh topic set on the session's own broker."""
    name = f"o-{uuid.uuid4().hex[:10]}"
    topic_set = TopicSet(broker.bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
    await create_topics(topic_set.kafka_settings(), partitions=6)
    return topic_set


async def migrated(url: str) -> str:
    """``url``, with the schema made."""
    async with store_for(url):
        pass
    return url


class TestBrokerOutage:
    """The broker goes away mid-stream: the worker says it waits, then goes on, losing and doubling nothing."""

    async def test_worker_waits_for_a_stopped_broker_and_continues_exactly(
        self, own_kafka: OwnKafka, sqlite_url: str, start_worker: Callable[[Mapping[str, str], str], WorkerProcess]
    ) -> None:
        """Broker stopped while batches flow: broker_unavailable is logged, and after the restart the counts are exact."""
        topics = await own_topics(own_kafka)
        env = topics.env(await migrated(sqlite_url), RC_WORKER_KAFKA__MAX_BATCH_RECORDS="20")
        first = valid_events(1500, rooms=12, prefix="bo1")
        await produce(topics.bootstrap, topics.topic, first)
        worker = start_worker(env, "worker")

        async def under_way() -> bool:
            assert worker.alive(), log_tail(worker)
            return (await counts(sqlite_url)).get("misc:message-count", 0) >= 300

        await wait_until(under_way, timeout=90, what="processing under way")
        own_kafka.stop()
        await wait_until(lambda: worker.events("broker_unavailable") or not worker.alive(), timeout=90, what="broker_unavailable")
        assert worker.alive(), log_tail(worker)
        own_kafka.start()
        second = valid_events(500, rooms=12, prefix="bo2")
        await produce(topics.bootstrap, topics.topic, second)

        await wait_until(counted(sqlite_url, room_counts(first + second)), timeout=150, what="every event counted")
        assert worker.terminate() == 0, log_tail(worker)

        assert sum(b["processed"] for b in worker.events("batch_committed")) == len(first) + len(second)
        ends = nonempty(await end_offsets(topics))
        assert nonempty(await group_offsets(topics)) == ends
        assert await stored_offsets(sqlite_url, topics) == ends


class TestDatabaseOutage:
    """The database goes away: the worker pauses, commits nothing to Kafka past it, and goes on when it is back."""

    async def test_worker_pauses_while_the_database_is_down_and_commits_nothing_past_it(
        self, own_postgres: OwnPostgres, topics: TopicSet, start_worker: Callable[[Mapping[str, str], str], WorkerProcess]
    ) -> None:
        """Database stopped: database_unavailable is logged, Kafka offsets stay where the database is, then counts are exact."""
        url = await migrated(await create_postgres_database(own_postgres.admin_url))
        env = topics.env(url, RC_WORKER_KAFKA__MAX_BATCH_RECORDS="50")
        first = valid_events(600, rooms=12, prefix="do1")
        await produce(topics.bootstrap, topics.topic, first)
        worker = start_worker(env, "worker")
        await wait_until(counted(url, room_counts(first)), timeout=90, what="the first events counted")
        ends_before = nonempty(await end_offsets(topics))
        await wait_until(lambda: _at(group_offsets(topics), ends_before), timeout=30, what="offsets committed to Kafka")

        own_postgres.stop()
        second = valid_events(600, rooms=12, prefix="do2")
        await produce(topics.bootstrap, topics.topic, second)
        await wait_until(lambda: worker.events("database_unavailable") or not worker.alive(), timeout=60, what="database_unavailable")
        assert worker.alive(), log_tail(worker)
        # Records of the second lot were fetched, and failed to commit in the database: none
        # may be committed to Kafka. Give a wrong worker the time to do it anyway.
        await asyncio.sleep(3)
        assert nonempty(await group_offsets(topics)) == ends_before

        own_postgres.start()
        await wait_until(counted(url, room_counts(first + second)), timeout=120, what="every event counted")
        assert worker.terminate() == 0, log_tail(worker)

        assert sum(b["processed"] for b in worker.events("batch_committed")) == len(first) + len(second)
        ends = nonempty(await end_offsets(topics))
        assert nonempty(await group_offsets(topics)) == ends
        assert await stored_offsets(url, topics) == ends


async def _at(found: Any, expected: Mapping[int, int]) -> bool:
    return nonempty(await found) == expected
