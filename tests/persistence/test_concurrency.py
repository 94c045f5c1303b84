"""Several OS processes run the naive read-increment-write counter on one database: every count ends exact.

The first two classes run tests/drivers/count_events.py in four processes that dispatch
events through the real Dispatcher and the built-in message-count app, all on one hot
counter; the last runs real `rc-worker run` processes on a Kafka topic and SIGKILLs one of
them at a moment when its database has committed state that Kafka's offsets do not cover yet.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.drivers.count_events import APP, ROOM, spawn
from tests.support import (
    TopicSet,
    WorkerProcess,
    counts,
    expected_counts,
    make_events,
    rc_worker,
    store_for,
    wait_until,
    write_distribution,
)
from worker.kafka import admin
from worker.persistence.schema import partition_offsets
from worker.persistence.store import Store

pytestmark = pytest.mark.slow

WORKERS = 4


class TestManyProcessesOneCounter:
    EVENTS = 300

    async def test_four_processes_count_every_event_exactly_once(self, database_url: str, store: Store) -> None:
        """Four processes, each its share of the events, all incrementing the same counters: both end at the event count."""
        tallies = await spawn(database_url, self.EVENTS, WORKERS)
        assert await counts(database_url) == {"misc:message-count": self.EVENTS, f"room:{ROOM}": self.EVENTS}
        assert sum(t["processed"] for t in tallies) == self.EVENTS
        assert sum(t["dead_lettered"] for t in tallies) == 0
        assert await store.processed_count(APP) == self.EVENTS
        # Without conflicts the processes did not overlap, and the test proved nothing.
        assert sum(t["conflicts"] for t in tallies) > 0, f"the processes never contended: {tallies}"


class TestDuplicatedEvents:
    EVENTS = 160

    async def test_an_event_delivered_to_every_process_is_counted_once(self, database_url: str, store: Store) -> None:
        """Each of four processes dispatches every event (same CloudEvents source and id): each is counted once."""
        tallies = await spawn(database_url, self.EVENTS, WORKERS, duplicates=True)
        assert await counts(database_url) == {"misc:message-count": self.EVENTS, f"room:{ROOM}": self.EVENTS}
        assert sum(t["processed"] for t in tallies) == self.EVENTS
        assert sum(t["duplicates"] for t in tallies) == self.EVENTS * (WORKERS - 1)
        assert await store.processed_count(APP) == self.EVENTS


# Ten milliseconds per event: the run lasts a few seconds however fast the worker gets.
PACER_SOURCE = """
import asyncio

from worker import App


class Pacer(App):
    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        await asyncio.sleep(0.01)
"""


@pytest.mark.kafka
class TestWorkerKilledBetweenCommits:
    async def test_a_worker_killed_after_its_database_commit_and_restarted_counts_each_event_once(
        self, topics: TopicSet, database_url: str, tmp_path: Path
    ) -> None:
        """SIGKILL while the database is ahead of Kafka's committed offsets, restart: every counter ends exact."""
        events = tmp_path / "events.jsonl"
        totals = make_events(events, count=800, rooms=4, seed=17, duplicate_every=40)
        records = sum(1 for line in events.read_text().splitlines() if line.strip())
        # Small batches and a handler that takes its time: many commits over a few seconds,
        # so the run lasts long enough to be caught mid-way.
        site = write_distribution(tmp_path / "site", "pacer-dist", {"pacer": "pacer_plugin:Pacer"}, {"pacer_plugin": PACER_SOURCE})
        env = topics.env(
            database_url,
            RC_WORKER_KAFKA__MAX_BATCH_RECORDS="20",
            RC_WORKER_HANDLERS__ENABLED='["message-count", "pacer"]',
            PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        )
        rc_worker("db", "upgrade", env=env)
        rc_worker("load", str(events), env=env)
        workers = [WorkerProcess(env, tmp_path / f"worker-{i}.log").start() for i in range(2)]
        try:
            async with store_for(database_url) as store:
                await wait_until(lambda: _consumed(store, topics), timeout=90, what="the first commits")
                caught = await _kill_with_database_ahead(workers[0], store, topics)
                workers[0].start()
                await wait_until(lambda: _consumed(store, topics, records), timeout=180, what=f"all {records} records committed")
            for worker in workers:
                assert worker.terminate() == 0
        finally:
            for worker in workers:
                if worker.alive():
                    worker.kill()
        assert caught, "the worker was never caught with its database ahead of Kafka"
        assert await counts(database_url) == expected_counts(totals)
        async with store_for(database_url) as store:
            assert await store.processed_count(APP) == totals["events"]


async def _consumed(store: Store, topics: TopicSet, records: int = 1) -> bool:
    """Whether the offsets committed with the state cover at least ``records`` records."""
    return sum((await store.stored_offsets(topics.group_id, topics.topic)).values()) >= records


async def _kill_with_database_ahead(worker: WorkerProcess, store: Store, topics: TopicSet) -> dict[int, tuple[int, int]]:
    """SIGKILL ``worker`` at an instant its database commit is ahead of its Kafka offset commit.

    The worker is frozen (SIGSTOP) while the two are compared, so what is seen is what the
    kill leaves behind; if the database is not ahead for a partition it owns, it resumes
    and is caught again a moment later. Returns {partition: (database offset, Kafka offset)}.
    """
    assert worker.process is not None
    pid = worker.process.pid
    async with admin(topics.kafka_settings()) as client:
        for _ in range(300):
            os.kill(pid, signal.SIGSTOP)
            owned = await _owned_offsets(store, topics, pid)
            committed = await _kafka_offsets(client, topics)
            ahead = {p: (o, committed.get(p, 0)) for p, o in owned.items() if o > committed.get(p, 0)}
            if ahead:
                worker.kill()  # a stopped process dies on SIGKILL all the same
                return ahead
            os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(random.uniform(0.02, 0.2))
    return {}


async def _owned_offsets(store: Store, topics: TopicSet, pid: int) -> dict[int, int]:
    # The runner's owner id is "<host>:<pid>:<random>": the partitions the frozen process holds.
    query = select(partition_offsets.c.partition, partition_offsets.c.next_offset, partition_offsets.c.owner).where(
        partition_offsets.c.group_id == topics.group_id, partition_offsets.c.topic == topics.topic
    )
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return {row.partition: row.next_offset for row in rows if f":{pid}:" in row.owner and row.next_offset is not None}


async def _kafka_offsets(client: Any, topics: TopicSet) -> dict[int, int]:
    offsets = await client.list_consumer_group_offsets(topics.group_id)
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topics.topic and meta.offset >= 0}
