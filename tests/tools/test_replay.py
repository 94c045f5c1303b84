"""rc-worker replay: the live worker's processing over a range of a topic, into a database of its own."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.support import (
    FIXTURES,
    RC_WORKER,
    ROOT,
    TopicSet,
    WorkerProcess,
    counts,
    expected_counts,
    make_events,
    on_terminal,
    rc_worker,
    store_for,
)
from worker.config import HandlerSettings, PersistenceSettings, Settings
from worker.errors import BrokerError, ConfigError
from worker.kafka import Outgoing, Producer, create_topics, group_offsets
from worker.persistence.schema import records
from worker.plugins import load_apps
from worker.tools.common import Start, state_store
from worker.tools.dump import read_records_file
from worker.tools.replay import Replay, command
from worker.tools.replay_summary import ReplaySummary

pytestmark = pytest.mark.kafka


def settings_for(topics: TopicSet, url: str, handlers: tuple[str, ...] = ("message-count",)) -> Settings:
    """Settings for in-process runs: every value named, none taken from the environment."""
    return Settings.model_construct(
        kafka=topics.kafka_settings(),
        persistence=PersistenceSettings.model_validate({"url": url}),
        handlers=HandlerSettings(enabled=handlers),
    )


async def produce(topics: TopicSet, path: Path, topic: str | None = None) -> int:
    """Produce a contract file's records as `rc-worker load` does; returns how many."""
    lines = read_records_file(path)
    async with Producer(topics.kafka_settings()) as producer:
        await producer.send_many([Outgoing(topic or topics.topic, r.key, r.value, r.headers) for r in lines])
    return len(lines)


async def replay(topics: TopicSet, url: str, **options: Any) -> ReplaySummary:
    """An in-process replay of ``topics.topic`` into ``url``."""
    config = settings_for(topics, url)
    store = state_store(url)
    try:
        return await Replay(config, load_apps(config.handlers.enabled, {}), store, **options).run()
    finally:
        await store.close()


async def state(url: str) -> list[tuple[str, tuple[str, ...], Any]]:
    """Every record of every app, without its random id and its version: (app, associations, data)."""
    async with store_for(url) as store, store.engine.connect() as conn:
        rows = (await conn.execute(select(records.c.app_id, records.c.associations, records.c.data))).all()
    return sorted((row.app_id, tuple(sorted(json.loads(row.associations))), json.loads(row.data)) for row in rows)


def mark_time() -> str:
    """Now as ISO 8601, with the records produced before it strictly earlier."""
    time.sleep(0.05)
    moment = time.time()
    time.sleep(0.05)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment * 1000) % 1000:03d}Z"


@dataclass(frozen=True)
class Live:
    """A topic the real worker (`rc-worker run`) processed, and what it made of it."""

    topics: TopicSet
    url: str
    totals: dict[str, Any]
    records: int


@pytest.fixture(scope="class")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Live:
    """400 events with duplicates and invalid records, processed by one `rc-worker run`."""
    tmp = tmp_path_factory.mktemp("live")
    name = f"t-{uuid.uuid4().hex[:10]}"
    topics = TopicSet(kafka_bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
    asyncio.run(create_topics(topics.kafka_settings(), partitions=6))
    totals = make_events(tmp / "events.jsonl", count=400, rooms=9, seed=61, duplicate_every=17, invalid_every=60, binary_every=7)
    loaded = asyncio.run(produce(topics, tmp / "events.jsonl"))
    url = f"sqlite+aiosqlite:///{tmp / 'live.db'}"

    async def upgrade() -> None:
        async with store_for(url):
            pass

    asyncio.run(upgrade())
    worker = WorkerProcess(topics.env(url), tmp / "worker.log").start()
    try:
        deadline = time.monotonic() + 120
        while asyncio.run(counts(url)) != expected_counts(totals):
            assert worker.alive(), f"rc-worker run exited early: {worker.log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"live processing did not finish: {asyncio.run(counts(url))}"
            time.sleep(0.5)
    finally:
        assert worker.terminate() == 0
    return Live(topics, url, totals, loaded)


class TestReplayEqualsLive:
    def test_full_replay_yields_the_records_live_processing_made(self, live: Live, tmp_path: Path) -> None:
        """`replay --from-beginning` into a fresh database ends with live processing's records."""
        url = f"sqlite+aiosqlite:///{tmp_path / 'replay.db'}"
        result = rc_worker("replay", "--from-beginning", "--state", url, "--json", env=live.topics.env(live.url))
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert asyncio.run(state(url)) == asyncio.run(state(live.url))
        assert (summary["records"], summary["dead_letters"], summary["duplicates"]) == (
            live.records,
            live.totals["invalid"],
            live.totals["duplicates"],
        )
        assert summary["per_app"] == {"message-count": live.totals["events"]}

    async def test_replay_leaves_the_live_groups_offsets_alone(self, live: Live, tmp_path: Path) -> None:
        """The live group's committed offsets are the same before and after a replay."""
        kafka = live.topics.kafka_settings()
        before = await group_offsets(kafka, kafka.group_id, kafka.topic)
        summary = await replay(live.topics, f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", start=Start())
        assert summary.records == live.records
        assert await group_offsets(kafka, kafka.group_id, kafka.topic) == before

    def test_a_replay_group_of_two_processes_shares_the_work_and_matches_live(self, live: Live, tmp_path: Path) -> None:
        """Two processes with one --group split the partitions; together they make live's records."""
        url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
        group = f"replay-{uuid.uuid4().hex[:8]}"
        args = [*RC_WORKER, "replay", "--from-beginning", "--group", group, "--state", url, "--json"]
        env = live.topics.env(live.url)
        members = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [member.communicate(timeout=150) for member in members]
        assert [member.returncode for member in members] == [0, 0], [err[-2000:] for _, err in outputs]
        summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        assert sum(s["records"] for s in summaries) >= live.records
        assert asyncio.run(state(url)) == asyncio.run(state(live.url))
        # The range is pinned in the group: the same replay again finds nothing left to do.
        assert asyncio.run(replay(live.topics, url, start=Start(), group=group)).records == 0

    async def test_a_group_replay_takes_a_batch_of_every_partition_per_round(
        self, live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Its units hold several partitions' batches, as a worker's do, not one partition's batch each."""
        from worker.pipeline.dispatch import Dispatcher

        units: list[int] = []
        together = Dispatcher.dispatch_together

        async def counted(self: Dispatcher, parts: Any, *args: Any) -> Any:
            units.append(len(parts))
            return await together(self, parts, *args)

        monkeypatch.setattr(Dispatcher, "dispatch_together", counted)
        url = f"sqlite+aiosqlite:///{tmp_path / 'grouped.db'}"
        config = settings_for(live.topics, url)
        # A batch far smaller than a partition's records: one fetch drains one partition only.
        config = config.model_copy(update={"kafka": config.kafka.model_copy(update={"max_batch_records": 20})})
        store = state_store(url)
        try:
            summary = await Replay(
                config, load_apps(("message-count",), {}), store, start=Start(), group=f"replay-{uuid.uuid4().hex[:8]}"
            ).run()
        finally:
            await store.close()
        assert summary.records == live.records
        assert await state(url) == await state(live.url)
        assert max(units) == 6  # before: 1, every unit one partition's batch

    def test_workers_two_split_the_partitions_among_processes_and_match_live(self, live: Live, tmp_path: Path) -> None:
        """--workers 2 runs two processes of one replay group; the summary adds them up and the state equals live's."""
        url = f"sqlite+aiosqlite:///{tmp_path / 'two.db'}"
        result = rc_worker("replay", "--from-beginning", "--workers", "2", "--state", url, "--json", env=live.topics.env(live.url))
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert asyncio.run(state(url)) == asyncio.run(state(live.url))
        assert (summary["records"], summary["dead_letters"]) == (live.records, live.totals["invalid"])
        assert summary["per_app"] == {"message-count": live.totals["events"]}
        assert summary["partitions"] == 6
        lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        progress = [line for line in lines if line["event"] == "progress"]
        assert (progress[-1]["done"], progress[-1]["total"]) == (live.records, live.records)


class TestRanges:
    async def test_from_offset_replays_only_the_named_partitions_from_their_offsets(
        self, topics: TopicSet, tmp_path: Path, database_url: str
    ) -> None:
        """--from-offset 0:2,3:0 reads partition 0 from offset 2 and partition 3 whole, nothing else (each backend)."""
        await produce(topics, FIXTURES / "valid.jsonl")
        whole = await replay(topics, f"sqlite+aiosqlite:///{tmp_path / 'all.db'}", start=Start())
        ends = await _ends(topics)
        summary = await replay(topics, database_url, start=Start(offsets={0: 2, 3: 0}))
        assert whole.records == sum(ends.values())
        assert summary.records == max(0, ends[0] - 2) + ends[3]

    async def test_a_time_window_replays_only_the_records_between_its_times(self, topics: TopicSet, tmp_path: Path) -> None:
        """--from-time/--to-time take the records produced between the two times."""
        make_events(tmp_path / "a.jsonl", count=20, seed=1)
        make_events(tmp_path / "b.jsonl", count=30, seed=2)
        await produce(topics, tmp_path / "a.jsonl")
        since = mark_time()
        inside = await produce(topics, tmp_path / "b.jsonl")
        until = mark_time()
        await produce(topics, tmp_path / "a.jsonl")
        args = argparse.Namespace(from_offset=None, from_time=since, to_time=until, handlers=None, group=None, topic=None)
        summary = await replay(topics, f"sqlite+aiosqlite:///{tmp_path / 'w.db'}", start=_start(args), to_time_ms=_ms(until))
        assert (summary.records, summary.per_app) == (inside, {"message-count": 30})


class TestProgress:
    async def test_on_a_terminal_replay_shows_a_count_a_rate_an_eta_and_its_summary(self, topics: TopicSet, tmp_path: Path) -> None:
        """On a pseudo-terminal: done of total, events/s, ETA, dead letters and duplicates, then the summary."""
        totals = make_events(tmp_path / "e.jsonl", count=150, rooms=5, seed=8, duplicate_every=25, invalid_every=50)
        records = await produce(topics, tmp_path / "e.jsonl")
        url = f"sqlite+aiosqlite:///{tmp_path / 't.db'}"
        env = topics.env(url, RC_WORKER_LOGGING__FORMAT="auto", RC_WORKER_LOGGING__LEVEL="info", TERM="xterm")
        status, output = on_terminal([*RC_WORKER, "replay", "--from-beginning", "--state", url], env)
        assert status == 0, output
        assert f"{records}/{records}" in output
        assert re.search(r"\d+(\.\d+)? events/s", output), output
        assert re.search(r"ETA \d\d:\d\d", output), output
        assert f"dead letters {totals['invalid']}, duplicates {totals['duplicates']}" in output
        assert f"replayed {records} records of {topics.topic}" in output
        assert "replay_batch_committed" not in output

    async def test_off_a_terminal_replay_logs_progress_and_batches_only_when_verbose(self, topics: TopicSet, tmp_path: Path) -> None:
        """Piped: progress lines ending with every record and no control character; batch lines only with --verbose."""
        make_events(tmp_path / "e.jsonl", count=100, rooms=4, seed=9)
        records = await produce(topics, tmp_path / "e.jsonl")
        env = topics.env(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", RC_WORKER_LOGGING__LEVEL="info")
        outputs = {}
        for flag in ("--quiet", "--json", "--verbose"):
            url = f"sqlite+aiosqlite:///{tmp_path / flag.strip('-')}.db"
            result = rc_worker("replay", "--from-beginning", "--state", url, flag, env=env)
            assert not re.search(r"[\r\x1b]", result.stdout + result.stderr)
            outputs[flag] = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        assert outputs["--quiet"] == []
        progress = [line for line in outputs["--json"] if line["event"] == "progress"]
        assert (progress[-1]["done"], progress[-1]["total"], progress[-1]["finished"]) == (records, records, True)
        assert not any(line["event"] == "replay_batch_committed" for line in outputs["--json"])
        batches = [line for line in outputs["--verbose"] if line["event"] == "replay_batch_committed"]
        assert sum(line["processed"] for line in batches) == records


class TestBadInput:
    async def test_an_empty_time_range_is_refused_before_the_database_is_created(self, topics: TopicSet, tmp_path: Path) -> None:
        """A range with no records is refused, naming it, and the database file never appears."""
        database = tmp_path / "never.db"
        with pytest.raises(
            ConfigError,
            match=r"has no records between 2099-01-01T00:00:00\.000Z and now in partitions \[0, 1, 2, 3, 4, 5\]; nothing was written",
        ):
            await replay(topics, f"sqlite+aiosqlite:///{database}", start=Start(time_ms=_ms("2099-01-01T00:00:00Z")))
        assert not database.exists()

    async def test_a_partition_the_topic_lacks_is_refused(self, topics: TopicSet, tmp_path: Path) -> None:
        """--from-offset naming partition 9 of a 6-partition topic says which partitions exist."""
        with pytest.raises(ConfigError, match=r"partition 9 does not exist: topic t-\w+ has partitions 0\.\.5"):
            await replay(topics, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", start=Start(offsets={9: 0}))
        assert not (tmp_path / "x.db").exists()

    async def test_an_unreachable_broker_fails_naming_it(self, topics: TopicSet, tmp_path: Path) -> None:
        """With no broker at the address, the replay fails at once and names the address."""
        config = settings_for(topics, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
        config = config.model_copy(update={"kafka": config.kafka.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})})
        store = state_store(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
        try:
            with pytest.raises(BrokerError, match=r"connecting to Kafka at 127\.0\.0\.1:1 failed"):
                await Replay(config, [], store).run()
        finally:
            await store.close()

    async def test_the_live_group_cannot_be_the_replay_group(self, topics: TopicSet, tmp_path: Path) -> None:
        """--group naming kafka.group_id is refused: it would move the live group's offsets."""
        args = argparse.Namespace(
            from_offset=None, from_time=None, to_time=None, handlers=None, topic=None, json=False, group=topics.group_id, state="x"
        )
        with pytest.raises(ConfigError, match="is the live consumer group"):
            await command(settings_for(topics, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"), args)


class TestReadmeExample:
    def test_the_incident_to_fixture_example_runs_as_written(self, topics: TopicSet, tmp_path: Path) -> None:
        """The README's commands dump a time window, load it elsewhere and replay it: the window's count."""
        block = re.search(r"<!-- replay-example -->\n```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
        assert block is not None, "README.md lost its replay example"
        first, *commands = block.group(1).splitlines()
        assert first.startswith("FROM=")  # the test sets these three itself
        make_events(tmp_path / "before.jsonl", count=25, seed=3)
        make_events(tmp_path / "incident.jsonl", count=35, seed=4, invalid_every=10)
        asyncio.run(produce(topics, tmp_path / "before.jsonl"))
        since = mark_time()
        asyncio.run(produce(topics, tmp_path / "incident.jsonl"))
        until = mark_time()
        asyncio.run(produce(topics, tmp_path / "before.jsonl"))
        env = topics.env(f"sqlite+aiosqlite:///{tmp_path / 'live.db'}", FROM=since, TO=until, INCIDENT=f"{topics.topic}-incident")
        env["PATH"] = f"{Path(RC_WORKER[0]).parent}{os.pathsep}{env['PATH']}"
        work = tmp_path / "work"
        work.mkdir()
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "\n".join(commands)],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout.strip().splitlines()[-1]) == [{"count": 35}]
        assert len((work / "incident.jsonl").read_text().splitlines()) == 35 + 3


async def _ends(topics: TopicSet) -> dict[int, int]:
    from worker.kafka import PartitionReader

    async with PartitionReader(topics.kafka_settings(), topics.topic) as reader:
        return {p: end for p, (_, end) in (await reader.bounds(range(6))).items()}


def _start(args: argparse.Namespace) -> Start:
    from worker.tools.common import start_from_args

    return start_from_args(args)


def _ms(text: str) -> int:
    from worker.tools.common import parse_time

    return parse_time(text, "--to-time")
