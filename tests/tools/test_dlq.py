"""rc-worker dlq: listing dead letters, and re-driving each of them once."""

from __future__ import annotations

import time

import orjson
import pytest

from tests.support import FIXTURES, TopicSet, counts, rc_worker, store_for
from worker.config import PersistenceSettings, Settings
from worker.constants import OUTBOX_ID_HEADER
from worker.events import RawRecord
from worker.kafka import Outgoing, PartitionReader, Producer
from worker.persistence.admin import claim_redrives, redrives
from worker.pipeline.dead_letters import dead_letter, truncate
from worker.plugins import load_apps
from worker.tools.common import Start, plan, read_spans
from worker.tools.dlq import DeadLetter, read_dead_letters, redrive, select
from worker.tools.dump import read_records_file

HANDLER_FAILURES = 3
DECODE_FAILURES = 2
# The value size of the dead letter fabricate_truncated() cuts to 10,000 bytes.
TRUNCATED_FROM = 20_000


async def fabricate(topics: TopicSet, age_hours: float = 1) -> list[RawRecord]:
    """Dead letters as the worker makes them: 3 of message-count's handler, 2 undecodable records, of events ``age_hours`` old."""
    sent_ms = int((time.time() - age_hours * 3600) * 1000)
    lines = read_records_file(FIXTURES / "valid.jsonl")[:HANDLER_FAILURES] + read_records_file(FIXTURES / "invalid.jsonl")[:DECODE_FAILURES]
    originals, letters = [], []
    for number, line in enumerate(lines):
        original = RawRecord(topics.topic, number % 6, 100 + number, sent_ms + number, line.key, line.value, line.headers)
        if number < HANDLER_FAILURES:
            letter = dead_letter(
                original, topics.dead_letter_topic, "RuntimeError: boom", stage="handler", app_id="message-count", error_type="RuntimeError"
            )
        else:
            letter = dead_letter(original, topics.dead_letter_topic, "value is not JSON", stage="decode")
        originals.append(original)
        letters.append(Outgoing(letter.topic, letter.key, letter.value, [*letter.headers, (OUTBOX_ID_HEADER, f"g:{number}".encode())], 0))
    async with Producer(topics.kafka_settings()) as producer:
        await producer.send_many(letters)
    return originals


async def fabricate_truncated(topics: TopicSet) -> None:
    """After fabricate()'s: a handler's dead letter as the outbox publishes one too large for its topic (value cut short)."""
    line = read_records_file(FIXTURES / "valid.jsonl")[HANDLER_FAILURES]
    value = line.value + b" " * (TRUNCATED_FROM - len(line.value))
    original = RawRecord(topics.topic, 5, 105, 1_764_410_400_005, line.key, value, line.headers)
    letter = dead_letter(
        original, topics.dead_letter_topic, "RuntimeError: boom", stage="handler", app_id="message-count", error_type="RuntimeError"
    )
    cut = truncate(Outgoing(letter.topic, letter.key, letter.value, [*letter.headers, (OUTBOX_ID_HEADER, b"g:5")], 0), 10_000)
    assert cut is not None
    async with Producer(topics.kafka_settings()) as producer:
        await producer.send_many([cut])


async def topic_records(topics: TopicSet) -> list[tuple[bytes | None, tuple[tuple[str, bytes], ...], bytes | None]]:
    """(key, headers, value) of every record of the event topic."""
    kafka = topics.kafka_settings()
    async with PartitionReader(kafka, kafka.topic) as reader:
        spans = await plan(kafka, reader, Start())
        return [(r.key, r.headers, r.value) async for r in read_spans(reader, spans, 500, 500)]


def settings_for(topics: TopicSet, url: str) -> Settings:
    return Settings.model_construct(kafka=topics.kafka_settings(), persistence=PersistenceSettings.model_validate({"url": url}))


@pytest.fixture
async def ledger_url(sqlite_url: str) -> str:
    """A migrated SQLite state database, where the redrive ledger lives."""
    async with store_for(sqlite_url):
        pass
    return sqlite_url


@pytest.fixture
async def any_ledger_url(database_url: str) -> str:
    """A migrated state database on each backend."""
    async with store_for(database_url):
        pass
    return database_url


@pytest.mark.kafka
class TestList:
    async def test_list_prints_one_line_per_dead_letter_with_origin_app_stage_and_reason(self, topics: TopicSet, ledger_url: str) -> None:
        """Each dead letter: its position, where it came from, app, stage, reason, redrive status."""
        await fabricate(topics)
        result = rc_worker("dlq", "list", env=topics.env(ledger_url))
        lines = [line.split("\t") for line in result.stdout.splitlines()]
        assert len(lines) == HANDLER_FAILURES + DECODE_FAILURES
        assert lines[0] == ["0/0", f"{topics.topic}/0/100", "message-count", "handler", "RuntimeError: boom", "-", "-"]
        assert lines[-1] == ["0/4", f"{topics.topic}/4/104", "-", "decode", "value is not JSON", "-", "-"]

    async def test_list_shows_the_original_size_of_a_value_cut_short(self, topics: TopicSet, ledger_url: str) -> None:
        """A truncated dead letter ends its line with "truncated from N bytes" and has truncated_from_bytes in JSON."""
        await fabricate(topics)
        await fabricate_truncated(topics)
        env = topics.env(ledger_url)
        lines = [line.split("\t") for line in rc_worker("dlq", "list", env=env).stdout.splitlines()]
        items = [orjson.loads(line) for line in rc_worker("dlq", "list", "--json", env=env).stdout.splitlines()]
        whole = HANDLER_FAILURES + DECODE_FAILURES
        assert [line[-1] for line in lines] == ["-"] * whole + [f"truncated from {TRUNCATED_FROM} bytes"]
        assert [item["truncated_from_bytes"] for item in items] == [None] * whole + [TRUNCATED_FROM]


@pytest.mark.kafka
class TestRedrive:
    async def test_redrive_sends_each_original_back_once(self, topics: TopicSet, ledger_url: str) -> None:
        """The originals (rc-dlq-* and outbox headers gone) reach their topic; a second redrive sends nothing."""
        originals = await fabricate(topics)
        env = topics.env(ledger_url)
        first = rc_worker("dlq", "redrive", env=env)
        assert first.stdout.splitlines()[-1] == "sent 5 dead letters to their topics; 0 already re-driven, left alone"
        expected = sorted(((r.key, r.headers, r.value) for r in originals), key=repr)
        assert sorted(await topic_records(topics), key=repr) == expected
        second = rc_worker("dlq", "redrive", env=env)
        assert second.stdout.splitlines()[-1] == "sent 0 dead letters to their topics; 5 already re-driven, left alone"
        assert sorted(await topic_records(topics), key=repr) == expected

    async def test_redrive_through_an_app_whose_commands_topic_is_missing_fails_before_sending(
        self, topics: TopicSet, ledger_url: str
    ) -> None:
        """redrive --app checks the topics its outbox writes to first: exit 2, the command that creates them, nothing claimed."""
        await fabricate(topics)
        missing = f"{topics.commands_topic}-missing"
        env = topics.env(ledger_url, RC_WORKER_KAFKA__COMMANDS_TOPIC=missing)
        result = rc_worker("dlq", "redrive", "--app", "message-count", env=env, check=False)
        assert result.returncode == 2
        assert f"topic {missing} does not exist" in result.stderr
        assert "rc-worker topics create" in result.stderr
        assert "--create-topic" not in result.stderr
        async with store_for(ledger_url) as store:
            assert await redrives(store, topics.dead_letter_topic) == {}

    async def test_dlq_commands_log_progress_off_a_terminal(self, topics: TopicSet, ledger_url: str) -> None:
        """Piped, list and redrive log progress lines that end with every dead letter read and sent."""
        await fabricate(topics)
        env = topics.env(ledger_url)
        for action, tasks in (("list", {"dlq read": 5}), ("redrive", {"dlq read": 5, "dlq redrive": 5})):
            result = rc_worker("dlq", action, env=env)
            lines = [orjson.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
            last = {line["task"]: line["done"] for line in lines if line["event"] == "progress"}
            assert last == tasks

    async def test_redrive_skips_a_truncated_dead_letter_and_says_so(self, topics: TopicSet, ledger_url: str) -> None:
        """A value cut short is not sent nor claimed: logged with its position, counted in the summary; the whole ones go."""
        originals = await fabricate(topics)
        await fabricate_truncated(topics)
        result = rc_worker("dlq", "redrive", env=topics.env(ledger_url))
        summary = result.stdout.splitlines()[-1]
        assert summary.startswith("sent 5 dead letters to their topics; 0 already re-driven, left alone; 1 cut short")
        assert f"skipped dead letter 0/5 (from {topics.topic}/5/105)" in result.stdout
        logged = [orjson.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
        [skipped] = [e for e in logged if e["event"] == "dlq_redrive_skipped"]
        assert (skipped["topic"], skipped["partition"], skipped["offset"]) == (topics.dead_letter_topic, 0, 5)
        assert (skipped["reason"], skipped["original_value_bytes"]) == ("value_truncated", TRUNCATED_FROM)
        assert (skipped["original_topic"], skipped["original_partition"], skipped["original_offset"]) == (topics.topic, 5, 105)
        assert sorted(await topic_records(topics), key=repr) == sorted(((r.key, r.headers, r.value) for r in originals), key=repr)
        async with store_for(ledger_url) as store:
            assert sorted(await redrives(store, topics.dead_letter_topic)) == [(0, n) for n in range(5)]

    async def test_redrive_to_the_topic_past_the_marker_retention_needs_force(self, topics: TopicSet, ledger_url: str) -> None:
        """Events older than processed_retention_hours: refused and nothing sent; with --force sent, each logged."""
        originals = await fabricate(topics, age_hours=24 * 8)  # the default retention is 7 days
        env = topics.env(ledger_url)
        refused = rc_worker("dlq", "redrive", env=env, check=False)
        assert refused.returncode == 1
        assert "3 dead letter(s) (0/0, 0/1, 0/2) hold events older than persistence.processed_retention_hours (168 h)" in refused.stderr
        assert "pass --force" in refused.stderr
        assert await topic_records(topics) == []
        async with store_for(ledger_url) as store:
            assert await redrives(store, topics.dead_letter_topic) == {}
        forced = rc_worker("dlq", "redrive", "--force", env=env)
        assert forced.stdout.splitlines()[-1] == "sent 5 dead letters to their topics; 0 already re-driven, left alone"
        assert "sent with --force: 3 dead letters" in forced.stdout
        logged = [orjson.loads(line) for line in forced.stderr.splitlines() if line.startswith("{")]
        warned = [(e["partition"], e["offset"]) for e in logged if e["event"] == "dlq_redrive_past_retention"]
        assert warned == [(0, 0), (0, 1), (0, 2)]  # the undecodable ones never reached an app
        assert len(await topic_records(topics)) == len(originals)

    async def test_redrive_through_an_app_is_not_held_to_the_retention(self, topics: TopicSet, ledger_url: str) -> None:
        """--app sends to the one app that failed them, which has no marker to lose: no --force needed."""
        await fabricate(topics, age_hours=24 * 30)
        settings = settings_for(topics, ledger_url)
        app = load_apps(["message-count"], {})[0]
        letters = select(await read_dead_letters(settings.kafka), "message-count", None)
        async with store_for(ledger_url) as store:
            result = await redrive(settings, store, letters, app)
        assert (len(result.sent), result.past_retention) == (HANDLER_FAILURES, [])

    async def test_redrive_through_an_app_changes_state_once(self, topics: TopicSet, any_ledger_url: str) -> None:
        """--app runs its dead letters through that app into the database, once; the topic gets nothing."""
        await fabricate(topics)
        settings = settings_for(topics, any_ledger_url)
        app = load_apps(["message-count"], {})[0]
        letters = select(await read_dead_letters(settings.kafka), "message-count", None)
        async with store_for(any_ledger_url) as store:
            first = await redrive(settings, store, letters, app)
            second = await redrive(settings, store, letters, app)
        assert (len(first.sent), len(second.sent), len(second.skipped)) == (HANDLER_FAILURES, 0, HANDLER_FAILURES)
        assert (await counts(any_ledger_url))["misc:message-count"] == HANDLER_FAILURES
        assert await topic_records(topics) == []

    async def test_dry_run_sends_and_records_nothing(self, topics: TopicSet, ledger_url: str) -> None:
        """--dry-run lists what would go, and neither the topic nor the ledger changes."""
        await fabricate(topics)
        settings = settings_for(topics, ledger_url)
        async with store_for(ledger_url) as store:
            result = await redrive(settings, store, await read_dead_letters(settings.kafka), None, dry_run=True)
            assert len(result.sent) == HANDLER_FAILURES + DECODE_FAILURES
            assert await redrives(store, topics.dead_letter_topic) == {}
        assert await topic_records(topics) == []

    async def test_a_claimed_but_unsent_dead_letter_is_sent_by_the_next_redrive(self, topics: TopicSet, any_ledger_url: str) -> None:
        """A redrive that claimed and then failed to send leaves it to the next one, which sends it."""
        originals = await fabricate(topics)
        settings = settings_for(topics, any_ledger_url)
        async with store_for(any_ledger_url) as store:
            await claim_redrives(store, topics.dead_letter_topic, {(0, 0): f"topic:{topics.topic}"})
            result = await redrive(settings, store, await read_dead_letters(settings.kafka), None)
            ledger = await redrives(store, topics.dead_letter_topic)
        assert len(result.sent) == HANDLER_FAILURES + DECODE_FAILURES
        assert all(entry.sent_at is not None for entry in ledger.values())
        assert len(await topic_records(topics)) == len(originals)


class TestSelect:
    def test_filters_pick_by_app_and_by_words_of_the_reason(self) -> None:
        """--app matches the app exactly; --reason matches part of the reason."""
        record = RawRecord("t", 0, 0, 0, None, b"")
        letters = [
            DeadLetter(0, 0, "a", "handler", "RuntimeError: boom", record),
            DeadLetter(0, 1, "b", "handler", "TimeoutError: slow", record),
            DeadLetter(0, 2, None, "decode", "value is not JSON", record),
        ]
        assert [d.offset for d in select(letters, "a", None)] == [0]
        assert [d.offset for d in select(letters, None, "not JSON")] == [2]
        assert [d.offset for d in select(letters, "b", "boom")] == []
