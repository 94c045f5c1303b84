"""rc-worker offsets: the group's committed and stored offsets, shown and reset."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
from structlog.testing import capture_logs

from tests.support import FIXTURES, TopicSet, rc_worker, store_for
from worker.config import PersistenceSettings, Settings
from worker.errors import ConfigError
from worker.kafka import Consumer, Outgoing, PartitionReader, Producer, commit_group_offsets, group_offsets
from worker.persistence.store import Store
from worker.persistence.unit import UnitOfWork
from worker.tools import progress
from worker.tools.dump import read_records_file
from worker.tools.offsets import reset_command, targets

pytestmark = pytest.mark.kafka


async def load_valid(topics: TopicSet) -> dict[int, int]:
    """The 40 valid samples in the topic; returns each partition's end offset."""
    async with Producer(topics.kafka_settings()) as producer:
        await producer.send_many([Outgoing(topics.topic, r.key, r.value, r.headers) for r in read_records_file(FIXTURES / "valid.jsonl")])
    async with PartitionReader(topics.kafka_settings(), topics.topic) as reader:
        return {p: end for p, (_, end) in (await reader.bounds(range(6))).items()}


async def store_offset(store: Store, topics: TopicSet, partition: int, next_offset: int) -> None:
    """Record ``next_offset`` with the state, as a worker's commit does."""
    claims = await store.claim(topics.group_id, topics.topic, [partition], "test")
    await store.commit(UnitOfWork(store), claims[partition].fence, next_offset)


def settings_for(topics: TopicSet, url: str) -> Settings:
    return Settings.model_construct(kafka=topics.kafka_settings(), persistence=PersistenceSettings.model_validate({"url": url}))


def args(**given: object) -> argparse.Namespace:
    return argparse.Namespace(**{"to_earliest": False, "to_latest": False, "to_time": None, "to_offset": None, "dry_run": False, **given})


class TestShow:
    async def test_show_prints_committed_stored_end_and_lag(self, topics: TopicSet, sqlite_url: str) -> None:
        """Per partition: the group's commit, the state's offset, the end, and the lag from the later of the two."""
        ends = await load_valid(topics)
        busy = sorted(p for p in ends if ends[p] >= 2)[:2]
        kafka = topics.kafka_settings()
        await commit_group_offsets(kafka, topics.group_id, topics.topic, {busy[0]: 1, busy[1]: 2})
        async with store_for(sqlite_url) as store:
            await store_offset(store, topics, busy[0], 2)
        result = rc_worker("offsets", "show", "--json", env=topics.env(sqlite_url))
        rows = {row["partition"]: row for row in map(json.loads, result.stdout.splitlines())}
        assert rows[busy[0]] == {
            "partition": busy[0],
            "earliest": 0,
            "committed": 1,
            "stored": 2,
            "end": ends[busy[0]],
            "lag": ends[busy[0]] - 2,
        }
        assert (rows[busy[1]]["committed"], rows[busy[1]]["stored"], rows[busy[1]]["lag"]) == (2, None, ends[busy[1]] - 2)
        assert sum(row["lag"] for row in rows.values()) == sum(ends.values()) - 4


class TestReset:
    async def test_reset_refuses_while_the_group_has_active_members(self, topics: TopicSet, sqlite_url: str) -> None:
        """With a member in the group, reset exits 1 naming it, and the committed offsets stay."""
        await load_valid(topics)
        kafka = topics.kafka_settings()
        member = Consumer(kafka)
        joined = asyncio.Event()

        async def on_assigned(_partitions: set[int]) -> None:
            joined.set()

        async def on_revoked(_partitions: set[int]) -> None:
            return None

        await member.start(on_revoked, on_assigned)
        try:
            async with asyncio.timeout(30):
                while not joined.is_set():  # the member only joins while it polls
                    await member.fetch(100, 1)
            await member.commit({0: 1})
            result = await asyncio.to_thread(rc_worker, "offsets", "reset", "--to-earliest", env=topics.env(sqlite_url), check=False)
        finally:
            await member.stop()
        assert result.returncode == 1
        assert f"consumer group {topics.group_id} has 1 active members" in result.stderr
        assert (await group_offsets(kafka, topics.group_id, topics.topic))[0][0] == 1

    async def test_reset_moves_kafka_and_the_database_offsets(
        self, topics: TopicSet, sqlite_url: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--to-earliest sets the group's commits and the state's stored offsets, so a worker starts there."""
        ends = await load_valid(topics)
        busy = max(ends, key=lambda p: ends[p])
        kafka = topics.kafka_settings()
        await commit_group_offsets(kafka, topics.group_id, topics.topic, dict(ends))
        async with store_for(sqlite_url) as store:
            await store_offset(store, topics, busy, ends[busy])
        assert await reset_command(settings_for(topics, sqlite_url), args(to_earliest=True)) == 0
        assert f"database offsets of partitions [{busy}] too" in capsys.readouterr().out
        assert {p: o for p, (o, _) in (await group_offsets(kafka, topics.group_id, topics.topic)).items()} == dict.fromkeys(ends, 0)
        async with store_for(sqlite_url) as store:
            assert await store.stored_offsets(topics.group_id, topics.topic) == {busy: 0}

    async def test_reset_reports_progress_over_kafka_and_the_database(self, topics: TopicSet, sqlite_url: str) -> None:
        """The reset's progress counts the six partitions' Kafka offsets, then each database offset."""
        ends = await load_valid(topics)
        await commit_group_offsets(topics.kafka_settings(), topics.group_id, topics.topic, dict(ends))
        async with store_for(sqlite_url):
            pass
        before = progress.display()
        progress.configure("log")
        try:
            with capture_logs() as logs:
                assert await reset_command(settings_for(topics, sqlite_url), args(to_earliest=True)) == 0
        finally:
            progress.configure(before)
        lines = [line for line in logs if line["event"] == "progress"]
        assert (lines[0]["done"], lines[-1]["done"], lines[-1]["total"], lines[-1]["finished"]) == (0, 12, 12, True)

    async def test_dry_run_changes_nothing(self, topics: TopicSet, sqlite_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        """--dry-run prints the new offsets and leaves Kafka's as they were."""
        ends = await load_valid(topics)
        kafka = topics.kafka_settings()
        await commit_group_offsets(kafka, topics.group_id, topics.topic, dict(ends))
        assert await reset_command(settings_for(topics, sqlite_url), args(to_earliest=True, dry_run=True)) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "dry run: nothing changed"
        assert {p: o for p, (o, _) in (await group_offsets(kafka, topics.group_id, topics.topic)).items()} == ends

    async def test_targets_by_offset_keep_other_partitions_and_by_time_find_the_first_record_after(self, topics: TopicSet) -> None:
        """--to-offset names only its partitions; --to-time far ahead is every partition's end."""
        ends = await load_valid(topics)
        kafka = topics.kafka_settings()
        assert await targets(kafka, args(to_offset="1:0")) == {1: 0}
        assert await targets(kafka, args(to_time="2099-01-01T00:00:00Z")) == ends
        assert await targets(kafka, args(to_latest=True)) == ends

    async def test_a_partition_the_topic_lacks_is_refused(self, topics: TopicSet) -> None:
        """--to-offset 6:0 of a 6-partition topic says which partitions exist."""
        with pytest.raises(ConfigError, match=r"partition 6 does not exist"):
            await targets(topics.kafka_settings(), args(to_offset="6:0"))
