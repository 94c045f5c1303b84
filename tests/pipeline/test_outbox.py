"""The outbox publishes every staged record exactly once: across crashes, restarts and takeovers.

Against the real broker: the publisher's two crash windows (after recording an attempt, and
after sending but before marking published) are reproduced step by step, then whole worker
processes are SIGKILLed mid-run while a handler stages one command per event.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
from pathlib import Path

import orjson
import pytest

from tests.support import TopicSet, WorkerProcess, load_events, store_for, wait_until, write_distribution
from worker.constants import OUTBOX_ID_HEADER
from worker.kafka import Outgoing, Producer, Reader, read_topic
from worker.persistence.records import OutboxMessage
from worker.persistence.store import Fence, Store
from worker.persistence.unit import UnitOfWork
from worker.pipeline.outbox import OutboxPublisher, outbox_id
from worker.testing import cloud_event, message

pytestmark = pytest.mark.kafka


async def _stage(store: Store, fence: Fence, topic: str, count: int) -> None:
    unit = UnitOfWork(store)
    for n in range(count):
        unit.publish(OutboxMessage("app", topic, f"room-{n % 4}".encode(), f"command-{n}".encode(), ()))
    await store.commit(unit, fence, next_offset=None)


async def _published(topics: TopicSet) -> collections.Counter[bytes]:
    return collections.Counter(
        [r.value or b"" async for r in read_topic(topics.kafka_settings(), topics.commands_topic, idle_timeout_ms=1000)]
    )


class TestPublisherCrashWindows:
    async def test_rows_sent_but_not_marked_are_recovered_without_sending_again(self, topics: TopicSet, sqlite_url: str) -> None:
        """A crash after the send and before marking: the next owner reads them back and sends nothing twice."""
        settings = topics.kafka_settings()
        async with store_for(sqlite_url) as store, Producer(settings) as producer, Reader(settings) as reader:
            fence = (await store.claim(topics.group_id, topics.topic, [0], "first"))[0].fence
            await _stage(store, fence, topics.commands_topic, 10)
            pending = await store.pending_outbox(topics.topic, 0, 100)
            # The first owner's steps, up to the crash: attempts recorded, records sent, no mark.
            targets = [await producer.partition_for(p.message.topic, p.message.key, p.id) for p in pending]
            ends = await reader.end_offsets({(topics.commands_topic, t) for t in targets})
            await store.record_attempts(fence, [(p.id, t, ends[(topics.commands_topic, t)]) for p, t in zip(pending, targets, strict=True)])
            await producer.send_many(
                [
                    Outgoing(p.message.topic, p.message.key, p.message.value, [(OUTBOX_ID_HEADER, outbox_id(fence, p.id))], t)
                    for p, t in zip(pending, targets, strict=True)
                ]
            )
            # A new owner takes the partition over and publishes.
            takeover = (await store.claim(topics.group_id, topics.topic, [0], "second"))[0].fence
            sent = await OutboxPublisher(store, producer, reader).publish(takeover)
            assert sent == 0
            assert await store.pending_outbox(topics.topic, 0, 100) == []
        assert await _published(topics) == collections.Counter(f"command-{n}".encode() for n in range(10))

    async def test_rows_attempted_but_never_sent_are_sent_by_the_next_owner(self, topics: TopicSet, sqlite_url: str) -> None:
        """A crash after recording the attempt and before the send: the next owner sends each once."""
        settings = topics.kafka_settings()
        async with store_for(sqlite_url) as store, Producer(settings) as producer, Reader(settings) as reader:
            fence = (await store.claim(topics.group_id, topics.topic, [0], "first"))[0].fence
            await _stage(store, fence, topics.commands_topic, 6)
            pending = await store.pending_outbox(topics.topic, 0, 100)
            await store.record_attempts(fence, [(p.id, 0, 0) for p in pending])
            takeover = (await store.claim(topics.group_id, topics.topic, [0], "second"))[0].fence
            assert await OutboxPublisher(store, producer, reader).publish(takeover) == 6
        assert await _published(topics) == collections.Counter(f"command-{n}".encode() for n in range(6))

    async def test_a_fenced_owner_cannot_record_attempts(self, topics: TopicSet, sqlite_url: str) -> None:
        """Once another worker claims the partition, the old owner's publisher stops before sending."""
        from worker.errors import FencedError

        settings = topics.kafka_settings()
        async with store_for(sqlite_url) as store, Producer(settings) as producer, Reader(settings) as reader:
            stale = (await store.claim(topics.group_id, topics.topic, [0], "first"))[0].fence
            await _stage(store, stale, topics.commands_topic, 3)
            await store.claim(topics.group_id, topics.topic, [0], "second")
            with pytest.raises(FencedError):
                await OutboxPublisher(store, producer, reader).publish(stale)
        assert await _published(topics) == collections.Counter()


class TestRounds:
    async def test_partitions_asking_together_publish_in_one_round_and_each_hears_its_own_count(
        self, topics: TopicSet, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The lanes of one shared unit: one read, one record of attempts under every fence, one send; every row once."""
        settings = topics.kafka_settings()
        async with store_for(sqlite_url) as store, Producer(settings) as producer, Reader(settings) as reader:
            claims = await store.claim(topics.group_id, topics.topic, [0, 1, 2], "worker")
            for partition, count in ((0, 2), (1, 3), (2, 4)):
                await _stage(store, claims[partition].fence, topics.commands_topic, count)
            rounds: list[int] = []
            record = store.record_attempts

            async def counted(fences: object, attempts: object) -> None:
                rounds.append(len(fences) if isinstance(fences, list) else 1)
                await record(fences, attempts)  # type: ignore[arg-type]

            monkeypatch.setattr(store, "record_attempts", counted)
            publisher = OutboxPublisher(store, producer, reader)
            sent = await asyncio.gather(*(publisher.publish(claims[p].fence) for p in (0, 1, 2)))
            assert sent == [2, 3, 4]
            assert rounds == [3]
            assert await store.pending_outbox(topics.topic, [0, 1, 2], 100) == []
        assert sum((await _published(topics)).values()) == 9

    async def test_a_fenced_partition_in_a_round_fails_alone_and_the_others_publish(self, topics: TopicSet, sqlite_url: str) -> None:
        """The shared round fails on the stale fence; each partition then publishes alone and learns its own outcome."""
        from worker.errors import FencedError

        settings = topics.kafka_settings()
        async with store_for(sqlite_url) as store, Producer(settings) as producer, Reader(settings) as reader:
            claims = await store.claim(topics.group_id, topics.topic, [0, 1], "worker")
            for partition in (0, 1):
                await _stage(store, claims[partition].fence, topics.commands_topic, 2)
            await store.claim(topics.group_id, topics.topic, [1], "another worker")
            publisher = OutboxPublisher(store, producer, reader)
            found = await asyncio.gather(*(publisher.publish(claims[p].fence) for p in (0, 1)), return_exceptions=True)
            assert found[0] == 2
            assert isinstance(found[1], FencedError)
            assert [p.source_partition for p in await store.pending_outbox(topics.topic, [0, 1], 100)] == [1, 1]
        assert sum((await _published(topics)).values()) == 2


# One command per event, so the commands topic must end with exactly as many as there are events.
TAGGER_SOURCE = """
from worker import App


class Tagger(App):
    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        updater = modify.get_updater()
        await updater.finish(updater.message(message.id, "tagger").add_custom_field("seen", True))
"""


@pytest.mark.slow
class TestWorkersKilled:
    async def test_commands_arrive_once_each_though_workers_are_killed_mid_run(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path
    ) -> None:
        """Two workers, one SIGKILLed and restarted again and again: every command exactly once."""
        site = write_distribution(tmp_path / "site", "tagger-dist", {"tagger": "tagger_plugin:Tagger"}, {"tagger_plugin": TAGGER_SOURCE})
        env = topics.env(
            sqlite_url,
            PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            RC_WORKER_HANDLERS__ENABLED='["tagger"]',
            RC_WORKER_KAFKA__MAX_BATCH_RECORDS="50",  # many small commits: many windows to be killed in
        )
        count = 3000
        events = [cloud_event(message(f"m{n}", room=f"room-{n % 12}")) for n in range(count)]
        load_events(events, tmp_path / "events.jsonl", env)

        steady = WorkerProcess(env, tmp_path / "steady.log").start()
        victim = WorkerProcess(env, tmp_path / "victim.log").start()
        rng = random.Random(7)
        kills = 0

        async def processed() -> int:
            async with store_for(sqlite_url) as store:
                return await store.processed_count("tagger")

        try:
            for _ in range(6):  # bounded: six kill-and-restart rounds at most
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                if await processed() >= count:
                    break
                victim.kill()
                kills += 1
                victim.start()

            async def all_processed() -> bool:
                return await processed() >= count

            await wait_until(all_processed, timeout=180, what="every event processed")

            async def all_published() -> bool:
                return sum((await _published(topics)).values()) >= count

            await wait_until(all_published, timeout=120, what="every command on the commands topic")
        finally:
            assert steady.terminate() == 0
            if victim.alive():
                victim.terminate()
        assert kills >= 1, "no worker was killed: the test proved nothing"
        records = [r async for r in read_topic(topics.kafka_settings(), topics.commands_topic, idle_timeout_ms=1000)]
        ids = collections.Counter(orjson.loads(r.value or b"")["id"] for r in records)
        assert sorted(ids) == sorted(f"{e['source']}/{e['id']}/tagger/0" for e in events)
        assert max(ids.values()) == 1, f"commands sent twice: {[i for i, n in ids.items() if n > 1][:5]}"
