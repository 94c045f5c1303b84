"""Chaos: three workers, tens of thousands of events, kills, a broker restart, a database restart.

Three `rc-worker run` processes share a topic of the session's own broker and a PostgreSQL
database of the session's own cluster (tests/services.py), running message-count and
mentions. Events (duplicates, invalid records, binary mode mixed in; some mentioning users,
so that mentions stages commands) arrive in lots while a worker is SIGKILLed and restarted
every few seconds, the broker is restarted once and the database once. At the end every
counter is exact, the dead-letter topic holds each invalid record exactly once, and the
commands topic each staged command exactly once. The figures are printed for the issue note.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.services import OwnKafka, OwnPostgres
from tests.support import TopicSet, WorkerProcess, counts, create_postgres_database, expected_counts, make_events, store_for
from worker.errors import DecodeError
from worker.events import RawRecord, decode
from worker.kafka import Outgoing, Producer, create_topics, read_topic
from worker.tools.dump import read_records_file

pytestmark = [pytest.mark.slow, pytest.mark.kafka, pytest.mark.postgres]

EVENTS = 20_000
LOTS = 8
WORKERS = 3
KILL_EVERY_S = 5.0  # a killed worker's partitions wait out its session (6 s, the broker's minimum)
CHAOS_S = 50.0  # the kills go on at least this long, and until every lot is loaded; then CONVERGE_S to finish
CONVERGE_S = 120.0  # about 60 s on this 2-core machine; the rest is headroom for a loaded CI host
BROKER_RESTART_STEP = 3
DATABASE_RESTART_STEP = 6
MENTIONS_EVERY = 7  # every 7th event (by number) mentions someone
HANDLERS = ["message-count", "mentions"]


def add_mentions(path: Path) -> set[str]:
    """Make every MENTIONS_EVERY-th event mention a user; returns the ids of the commands that must follow.

    Decided by the event's number, so a duplicate of an event is changed the same way and
    stays the same event.
    """
    expected: set[str] = set()
    lines = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if "why" not in item:
            binary = "ce_id" in item["headers"]
            document = json.loads(item["value"])
            message = document if binary else document["data"]
            event_id = item["headers"]["ce_id"] if binary else document["id"]
            number = int(event_id.rsplit("-", 1)[1])
            if number % MENTIONS_EVERY == 0:
                message["text"] = f"ping @watcher{number % 5} about {message.get('text', '')}"
                source = item["headers"]["ce_source"] if binary else document["source"]
                expected.add(f"{source}/{event_id}/mentions/0")
                item["value"] = json.dumps(document, ensure_ascii=False)
        lines.append(json.dumps(item, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n")
    return expected


@dataclass
class Figures:
    """What the run did and what it got wrong (lost and doubled must be zero)."""

    events: int
    duplicates: int
    invalid: int
    commands_expected: int = 0
    # What the chaos did, by kind: kills, worker_restarts, broker_restarts, database_restarts.
    done: Counter[str] = field(default_factory=Counter)
    lost: dict[str, int] = field(default_factory=dict)
    doubled: dict[str, int] = field(default_factory=dict)
    chaos_s: float = 0.0
    converged_s: float = 0.0
    seconds: float = 0.0

    def line(self) -> str:
        """One line for the issue note."""
        return "chaos figures: " + json.dumps(self.__dict__, sort_keys=True)


@dataclass
class Cluster:
    """The worker processes, each restartable."""

    env: dict[str, str]
    directory: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start(self) -> None:
        for n in range(WORKERS):
            self.workers.append(WorkerProcess(self.env, self.directory / f"worker-{n}.log").start())

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a worker, as a crash would, and start it again at once."""
        worker = rng.choice(self.workers)
        worker.kill()
        worker.start()

    def revive(self) -> int:
        """Start any worker that exited by itself; returns how many did."""
        dead = [w for w in self.workers if not w.alive()]
        for worker in dead:
            worker.start()
        return len(dead)

    def stop(self) -> list[int]:
        for worker in self.workers:
            if worker.alive() and worker.process is not None:
                worker.process.terminate()
        return [w.process.wait(timeout=60) for w in self.workers if w.process is not None]

    def kill_all(self) -> None:
        for worker in self.workers:
            if worker.alive():
                worker.kill()

    def batches(self) -> list[dict[str, Any]]:
        return [b for w in self.workers for b in w.events("batch_committed")]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Cluster]]:
    """A holder for the test's cluster; every worker is killed at the end whatever happens."""
    holder: list[Cluster] = []
    yield holder
    for found in holder:
        found.kill_all()


async def load(topics: TopicSet, path: Path) -> int:
    """Produce a contract file's records to the event topic, as `rc-worker load` does."""
    records = read_records_file(path)
    async with Producer(topics.kafka_settings()) as producer:
        await producer.send_many([Outgoing(topics.topic, r.key, r.value, r.headers) for r in records])
    return len(records)


def split(path: Path, lots: int) -> list[Path]:
    """The file cut into ``lots`` files of consecutive lines."""
    lines = path.read_text().splitlines(keepends=True)
    size = -(-len(lines) // lots)
    parts = []
    for n in range(lots):
        part = path.with_name(f"{path.stem}-{n}.jsonl")
        part.write_text("".join(lines[n * size : (n + 1) * size]))
        parts.append(part)
    return parts


def differences(found: dict[str, int], expected: dict[str, int]) -> tuple[int, int]:
    """(lost, doubled) between two counter maps."""
    lost = sum(max(0, n - found.get(k, 0)) for k, n in expected.items())
    doubled = sum(max(0, n - expected.get(k, 0)) for k, n in found.items())
    return lost, doubled


class TestChaos:
    """Nothing lost, nothing doubled, whatever is killed or restarted."""

    async def test_counts_dead_letters_and_commands_are_exact_through_kills_and_restarts(
        self, own_kafka: OwnKafka, own_postgres: OwnPostgres, tmp_path: Path, cluster: list[Cluster]
    ) -> None:
        """3 workers, SIGKILLs every few seconds, a broker and a database restart: every figure exact."""
        started = time.monotonic()
        name = f"chaos-{uuid.uuid4().hex[:8]}"
        topics = TopicSet(own_kafka.bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
        await create_topics(topics.kafka_settings(), partitions=6)
        url = await create_postgres_database(own_postgres.admin_url)
        async with store_for(url):
            pass
        path = tmp_path / "events.jsonl"
        totals = make_events(path, count=EVENTS, rooms=40, seed=11, duplicate_every=40, invalid_every=300, binary_every=9)
        commands = add_mentions(path) if "mentions" in HANDLERS else set()
        figures = Figures(totals["events"], totals["duplicates"], totals["invalid"], commands_expected=len(commands))

        env = topics.env(
            url,
            RC_WORKER_HANDLERS__ENABLED=json.dumps(HANDLERS),
            # mentions then runs only on messages with an "@": the others cost it nothing.
            RC_WORKER_HANDLERS__SETTINGS='{"mentions": {"reset_on_post": false}}',
            RC_WORKER_KAFKA__MAX_BATCH_RECORDS="200",
            RC_WORKER_PROCESSING__SHUTDOWN_TIMEOUT_S="10",
        )
        group = Cluster(env, tmp_path)
        cluster.append(group)
        group.start()

        rng = random.Random(5)
        lots = split(path, LOTS)
        chaos_ends = time.monotonic() + CHAOS_S
        step = 0
        while time.monotonic() < chaos_ends or lots:
            if lots:
                await load(topics, lots.pop(0))
            if step == BROKER_RESTART_STEP:
                own_kafka.restart()
                figures.done["broker_restarts"] += 1
            if step == DATABASE_RESTART_STEP:
                own_postgres.stop(mode="immediate")  # a crash: the cluster recovers at start
                await asyncio.sleep(2)
                own_postgres.start()
                figures.done["database_restarts"] += 1
            group.kill_one(rng)
            figures.done["kills"] += 1
            figures.done["worker_restarts"] += 1 + group.revive()
            step += 1
            await asyncio.sleep(KILL_EVERY_S)

        figures.chaos_s = round(time.monotonic() - started, 1)
        expected = expected_counts(totals)
        deadline = time.monotonic() + CONVERGE_S
        found: dict[str, int] = {}
        while time.monotonic() < deadline:
            figures.done["worker_restarts"] += group.revive()
            found = await counts(url)
            if found == expected:
                break
            await asyncio.sleep(1)
        figures.converged_s = round(time.monotonic() - started, 1)
        figures.lost["counters"], figures.doubled["counters"] = differences(found, expected)

        letters = await self._dead_letters(topics, totals["invalid"], deadline)
        invalid = {(r.partition, r.offset): r async for r in read_topic(topics.kafka_settings(), topics.topic) if _refused(r)}
        positions = Counter((int(x.header("rc-dlq-partition") or -1), int(x.header("rc-dlq-offset") or -1)) for x in letters)
        figures.lost["dead_letters"] = len(invalid.keys() - positions.keys())
        figures.doubled["dead_letters"] = sum(n - 1 for n in positions.values()) + len(positions.keys() - invalid.keys())

        staged = await self._commands(topics, len(commands), deadline)
        figures.lost["commands"] = len(commands - staged.keys())
        figures.doubled["commands"] = sum(n - 1 for n in staged.values()) + len(staged.keys() - commands)

        statuses = group.stop()
        figures.seconds = round(time.monotonic() - started, 1)
        print(figures.line())

        assert figures.lost == {"counters": 0, "dead_letters": 0, "commands": 0}, figures.line()
        assert figures.doubled == {"counters": 0, "dead_letters": 0, "commands": 0}, figures.line()
        assert found == expected
        assert len(letters) == totals["invalid"]
        for letter in letters:
            original = invalid[(int(letter.header("rc-dlq-partition") or -1), int(letter.header("rc-dlq-offset") or -1))]
            assert letter.value == original.value
            assert letter.header("rc-dlq-reason") == _reason(original).encode()
        assert sum(staged.values()) == len(commands)
        assert statuses == [0] * WORKERS
        assert figures.done["kills"] >= LOTS
        assert sum(b["processed"] for b in group.batches()) >= figures.events

    @staticmethod
    async def _dead_letters(topics: TopicSet, wanted: int, deadline: float) -> list[RawRecord]:
        letters: list[RawRecord] = []
        while True:
            letters = [r async for r in read_topic(topics.kafka_settings(), topics.dead_letter_topic, idle_timeout_ms=1000)]
            if len(letters) >= wanted or time.monotonic() > deadline:
                return letters
            await asyncio.sleep(1)

    @staticmethod
    async def _commands(topics: TopicSet, wanted: int, deadline: float) -> Counter[str]:
        staged: Counter[str] = Counter()
        while True:
            found = [r async for r in read_topic(topics.kafka_settings(), topics.commands_topic, idle_timeout_ms=1000)]
            staged = Counter(orjson.loads(r.value or b"{}").get("id", "?") for r in found)
            if sum(staged.values()) >= wanted or time.monotonic() > deadline:
                return staged
            await asyncio.sleep(1)


def _refused(record: RawRecord) -> bool:
    try:
        decode(record)
    except DecodeError:
        return True
    return False


def _reason(record: RawRecord) -> str:
    try:
        decode(record)
    except DecodeError as exc:
        return exc.reason
    raise AssertionError("a valid record in the dead-letter topic")
