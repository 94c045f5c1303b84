"""rc-worker dump and load: a topic as the contract's JSON lines, and back, byte for byte."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.support import FIXTURES, TopicSet, make_events, rc_worker
from worker.config import PersistenceSettings, Settings
from worker.errors import ConfigError
from worker.events import RawRecord
from worker.kafka import Outgoing, PartitionReader, Producer, create_topics, topic_partitions
from worker.tools.common import parse_time
from worker.tools.dump import DumpError, FileRecord, command, dump, encode_record, read_records_file

Key = tuple[bytes | None, tuple[tuple[str, bytes], ...], bytes]


def as_keys(lines: list[FileRecord]) -> list[Key]:
    return [(r.key, r.headers, r.value) for r in lines]


async def produce(topics: TopicSet, lines: list[FileRecord]) -> None:
    async with Producer(topics.kafka_settings()) as producer:
        await producer.send_many([Outgoing(topics.topic, r.key, r.value, r.headers) for r in lines])


async def end_offsets(topics: TopicSet) -> dict[int, int]:
    async with PartitionReader(topics.kafka_settings(), topics.topic) as reader:
        return {p: end for p, (_, end) in (await reader.bounds(range(6))).items()}


def unused_db(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"


@pytest.mark.kafka
class TestRoundTrip:
    async def test_load_of_a_dump_reproduces_every_record_byte_for_byte(
        self, topics: TopicSet, kafka_bootstrap: str, tmp_path: Path
    ) -> None:
        """Valid and invalid samples (the non-UTF-8 one too) survive dump -> load -> dump unchanged."""
        source = read_records_file(FIXTURES / "valid.jsonl") + read_records_file(FIXTURES / "invalid.jsonl")
        await produce(topics, source)
        env = topics.env(unused_db(tmp_path))
        first = tmp_path / "first.jsonl"
        rc_worker("dump", "--output", str(first), env=env)
        dumped = read_records_file(first)
        assert sorted(as_keys(dumped), key=repr) == sorted(as_keys(source), key=repr)
        for key in {r.key for r in source}:  # each room's records keep their order
            assert [r for r in as_keys(dumped) if r[0] == key] == [r for r in as_keys(source) if r[0] == key]
        assert any('"value_b64"' in line for line in first.read_text().splitlines())
        other = TopicSet(kafka_bootstrap, f"t-{uuid.uuid4().hex[:10]}", topics.dead_letter_topic, topics.commands_topic, topics.group_id)
        await create_topics(other.kafka_settings(), partitions=6)
        rc_worker("load", str(first), "--topic", other.topic, env=env)
        second = tmp_path / "second.jsonl"
        rc_worker("dump", "--topic", other.topic, "--output", str(second), env=env)
        assert second.read_bytes() == first.read_bytes()


@pytest.mark.kafka
class TestRanges:
    async def test_partition_option_dumps_only_that_partition(self, topics: TopicSet) -> None:
        """--partition P writes P's records, in offset order, and no other."""
        await produce(topics, read_records_file(FIXTURES / "valid.jsonl"))
        ends = await end_offsets(topics)
        busiest = max(ends, key=lambda p: ends[p])
        out = io.BytesIO()
        summary = await dump(topics.kafka_settings(), out, partition=busiest)
        assert (summary.records, summary.partitions) == (ends[busiest], [busiest])
        assert len(out.getvalue().splitlines()) == ends[busiest]

    async def test_time_window_dumps_only_the_records_between_its_times(self, topics: TopicSet, tmp_path: Path) -> None:
        """--from-time/--to-time write what was produced between the two times."""
        make_events(tmp_path / "a.jsonl", count=10, seed=1)
        make_events(tmp_path / "b.jsonl", count=15, seed=2)
        await produce(topics, read_records_file(tmp_path / "a.jsonl"))
        await asyncio.sleep(0.05)
        since = int(time.time() * 1000)
        await asyncio.sleep(0.05)
        inside = read_records_file(tmp_path / "b.jsonl")
        await produce(topics, inside)
        await asyncio.sleep(0.05)
        until = int(time.time() * 1000)
        await produce(topics, read_records_file(tmp_path / "a.jsonl"))
        out = io.BytesIO()
        await dump(topics.kafka_settings(), out, from_time_ms=since, to_time_ms=until)
        written = tmp_path / "window.jsonl"
        written.write_bytes(out.getvalue())
        assert sorted(as_keys(read_records_file(written)), key=repr) == sorted(as_keys(inside), key=repr)


@pytest.mark.kafka
class TestMissingTopic:
    def test_load_into_a_missing_topic_fails_at_once_with_the_command_that_creates_it(self, topics: TopicSet, tmp_path: Path) -> None:
        """load to a topic that does not exist exits 2, names the topic and the command, and creates nothing."""
        missing = f"{topics.topic}-missing"
        result = rc_worker("load", str(FIXTURES / "valid.jsonl"), "--topic", missing, env=topics.env(unused_db(tmp_path)), check=False)
        assert result.returncode == 2
        assert f"topic {missing} does not exist" in result.stderr
        assert f"RC_WORKER_KAFKA__TOPIC={missing} rc-worker topics create" in result.stderr
        assert "--create-topic" in result.stderr
        assert asyncio.run(topic_partitions(topics.kafka_settings(), missing)) == []

    def test_create_topic_creates_it_and_loads_every_record(self, topics: TopicSet, tmp_path: Path) -> None:
        """load --create-topic makes the topic (six partitions, as topics create) and loads the file into it."""
        missing = f"{topics.topic}-new"
        env = topics.env(unused_db(tmp_path))
        result = rc_worker("load", str(FIXTURES / "valid.jsonl"), "--topic", missing, "--create-topic", env=env)
        assert f"created {missing}" in result.stderr
        assert asyncio.run(topic_partitions(topics.kafka_settings(), missing)) == list(range(6))
        out = tmp_path / "back.jsonl"
        rc_worker("dump", "--topic", missing, "--output", str(out), env=env)
        source = read_records_file(FIXTURES / "valid.jsonl")
        assert sorted(as_keys(read_records_file(out)), key=repr) == sorted(as_keys(source), key=repr)


@pytest.mark.kafka
class TestProgress:
    def test_load_and_dump_log_progress_off_a_terminal_without_control_characters(self, topics: TopicSet, tmp_path: Path) -> None:
        """Piped, load and dump each end with a progress line of every record, and write no control character."""
        events = tmp_path / "events.jsonl"
        make_events(events, count=120, rooms=4, seed=3)
        env = topics.env(unused_db(tmp_path))
        for args in (["load", str(events)], ["dump", "--output", str(tmp_path / "out.jsonl")]):
            result = rc_worker(*args, env=env)
            assert not re.search(r"[\r\x1b]", result.stdout + result.stderr)
            lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
            last = [line for line in lines if line["event"] == "progress"][-1]
            assert (last["task"], last["done"], last["total"], last["finished"]) == (args[0], 120, 120, True)

    def test_quiet_load_prints_only_its_result(self, topics: TopicSet, tmp_path: Path) -> None:
        """load --quiet: no progress and no info lines, the one-line result on stdout."""
        result = rc_worker("load", str(FIXTURES / "valid.jsonl"), "--quiet", env=topics.env(unused_db(tmp_path)))
        assert result.stderr == ""
        assert result.stdout.startswith("loaded ")


@pytest.mark.kafka
class TestBadInput:
    def test_an_empty_range_exits_2_and_writes_no_file(self, topics: TopicSet, tmp_path: Path) -> None:
        """A window with no records is refused, and --output is not created."""
        out = tmp_path / "empty.jsonl"
        result = rc_worker(
            "dump", "--from-time", "2099-01-01T00:00:00Z", "--output", str(out), env=topics.env(unused_db(tmp_path)), check=False
        )
        assert result.returncode == 2
        assert "has no records between" in result.stderr
        assert not out.exists()

    async def test_a_partition_the_topic_lacks_is_refused(self, topics: TopicSet) -> None:
        """--partition 6 of a 6-partition topic names the partitions there are."""
        with pytest.raises(ConfigError, match=r"partition 6 does not exist: topic t-\w+ has partitions 0\.\.5"):
            await dump(topics.kafka_settings(), io.BytesIO(), partition=6)

    def test_an_unreachable_broker_fails_naming_it(self, topics: TopicSet, tmp_path: Path) -> None:
        """With no broker at the address, dump exits 1, names it, and writes nothing."""
        out = tmp_path / "none.jsonl"
        env = topics.env(unused_db(tmp_path), RC_WORKER_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1")
        result = rc_worker("dump", "--output", str(out), env=env, check=False)
        assert (result.returncode, out.exists()) == (1, False)
        assert "connecting to Kafka at 127.0.0.1:1 failed" in result.stderr

    def test_a_file_that_is_not_the_contract_names_the_line_and_loads_nothing(self, topics: TopicSet, tmp_path: Path) -> None:
        """load stops at the first bad line, says which and why, and produces none of the file."""
        bad = tmp_path / "bad.jsonl"
        good = (FIXTURES / "valid.jsonl").read_text().splitlines()
        bad.write_text("\n".join([*good[:2], '{"key": "r1", "headers": {}, "value": 7}', *good[2:4]]) + "\n")
        result = rc_worker("load", str(bad), env=topics.env(unused_db(tmp_path)), check=False)
        assert result.returncode == 2
        assert f"{bad}:3: value must be a string" in result.stderr
        assert sum(asyncio.run(end_offsets(topics)).values()) == 0

    async def test_a_record_the_format_cannot_hold_stops_the_dump_and_writes_nothing(self, topics: TopicSet, tmp_path: Path) -> None:
        """A header that is not UTF-8 is named with its position; --output is not created."""
        async with Producer(topics.kafka_settings()) as producer:
            await producer.send_many([Outgoing(topics.topic, b"r1", b"{}", [("trace", b"\xff\xfe")], 2)])
        out = tmp_path / "never.jsonl"
        args = argparse.Namespace(topic=None, from_time=None, to_time=None, partition=None, output=out)
        with pytest.raises(DumpError, match=r"t-\w+\[2\]@0: header 'trace' is not UTF-8"):
            await command(_settings(topics, tmp_path), args)
        assert not out.exists()


class TestEncoding:
    def test_a_value_that_is_not_utf8_is_written_as_base64(self) -> None:
        """The contract's invalid UTF-8 sample becomes value_b64, and decodes to the same bytes."""
        raw = base64.b64decode(json.loads((FIXTURES / "invalid.jsonl").read_text().splitlines()[-1])["value_b64"])
        line = json.loads(encode_record(RawRecord("t", 0, 5, 0, b"bad", raw, (("content-type", b"x"),))))
        assert line == {"key": "bad", "headers": {"content-type": "x"}, "value_b64": base64.b64encode(raw).decode()}

    def test_a_tombstone_is_refused(self) -> None:
        """A record without a value cannot be written: the dump stops and says where."""
        with pytest.raises(DumpError, match=r"t\[1\]@9 is a tombstone"):
            encode_record(RawRecord("t", 1, 9, 0, b"k", None))

    def test_times_without_an_offset_are_utc(self) -> None:
        """2026-11-29T10:00:00 and 2026-11-29T10:00:00Z are the same instant."""
        assert parse_time("2026-11-29T10:00:00", "--from-time") == parse_time("2026-11-29T10:00:00Z", "--from-time")
        with pytest.raises(ConfigError, match="--from-time 'yesterday' is not an ISO 8601 time"):
            parse_time("yesterday", "--from-time")


def _settings(topics: TopicSet, tmp_path: Path) -> Settings:
    return Settings.model_construct(
        kafka=topics.kafka_settings(), persistence=PersistenceSettings.model_validate({"url": unused_db(tmp_path)})
    )
