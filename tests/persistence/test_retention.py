"""Retention of processed-event markers: pruned in bounded batches, by the worker and by `rc-worker db prune`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import event, func, select
from structlog.testing import capture_logs

from tests.support import ROOT, StartWorker, TopicSet, make_events, rc_worker, store_for, wait_until
from worker.config import PersistenceSettings
from worker.observability import Health, Metrics, Observer
from worker.persistence.retention import prune_processed, pruning
from worker.persistence.schema import processed_events
from worker.persistence.store import Store

OLD = timedelta(days=2)
RECENT = timedelta(minutes=10)


async def add_markers(store: Store, age: timedelta, count: int, source: str) -> None:
    """``count`` markers of message-count from ``source``, processed ``age`` ago."""
    processed_at = datetime.now(UTC) - age
    rows = [{"app_id": "message-count", "source": source, "event_id": f"{source}-{i}", "processed_at": processed_at} for i in range(count)]
    async with store.engine.begin() as conn:
        await conn.execute(processed_events.insert(), rows)


async def markers(store: Store, source: str | None = None) -> int:
    """How many markers there are (from ``source``, if given)."""
    query = select(func.count()).select_from(processed_events)
    if source is not None:
        query = query.where(processed_events.c.source == source)
    async with store.engine.connect() as conn:
        return int(await conn.scalar(query) or 0)


@pytest.fixture
def deletes(store: Store) -> Iterator[list[int]]:
    """The row count of every DELETE statement the store's engine runs during the test."""
    counts: list[int] = []

    def after(_conn: Any, cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            counts.append(cursor.rowcount)

    event.listen(store.engine.sync_engine, "after_cursor_execute", after)
    yield counts
    event.remove(store.engine.sync_engine, "after_cursor_execute", after)


def settings(url: str, retention_hours: int = 1, interval_s: float = 0.05) -> PersistenceSettings:
    return PersistenceSettings(url=url, processed_retention_hours=retention_hours, prune_interval_s=interval_s)  # type: ignore[arg-type]


def fresh_observer() -> Observer:
    return Observer(Metrics(CollectorRegistry()), Health())


def pruned_total(observer: Observer) -> float:
    value = observer.metrics.registry.get_sample_value("rc_worker_processed_markers_pruned_total")
    return value or 0.0


def cli_env(url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RC_WORKER_")}
    return {**env, "RC_WORKER_CONFIG": str(ROOT / "config.yaml"), "RC_WORKER_PERSISTENCE__URL": url, **extra}


class TestPruneProcessed:
    async def test_markers_older_than_the_cutoff_are_removed_and_newer_kept(self, store: Store) -> None:
        """Markers processed before the cutoff go; those after it stay, whatever their app or source."""
        await add_markers(store, OLD, 7, "/old")
        await add_markers(store, RECENT, 4, "/recent")
        removed = await prune_processed(store, datetime.now(UTC) - timedelta(hours=1))
        assert removed == 7
        assert (await markers(store, "/old"), await markers(store, "/recent")) == (0, 4)

    async def test_a_cutoff_in_another_time_zone_means_the_same_instant(self, store: Store) -> None:
        """The cutoff is compared as an instant: UTC-5 one hour ago prunes what UTC one hour ago does."""
        await add_markers(store, timedelta(hours=2), 3, "/two-hours")
        await add_markers(store, RECENT, 2, "/recent")
        cutoff = (datetime.now(UTC) - timedelta(hours=1)).astimezone(timezone(timedelta(hours=-5)))
        assert await prune_processed(store, cutoff) == 3
        assert await markers(store) == 2

    async def test_prune_deletes_in_bounded_batches(self, store: Store, deletes: list[int]) -> None:
        """12 expired markers with batch=5 go in three statements of 5, 5 and 2."""
        await add_markers(store, OLD, 12, "/old")
        assert await prune_processed(store, datetime.now(UTC) - timedelta(hours=1), batch=5) == 12
        assert deletes == [5, 5, 2]
        assert await markers(store) == 0

    async def test_nothing_expired_removes_nothing_in_one_statement(self, store: Store, deletes: list[int]) -> None:
        """With only recent markers, one DELETE finds nothing and the prune ends."""
        await add_markers(store, RECENT, 3, "/recent")
        assert await prune_processed(store, datetime.now(UTC) - timedelta(hours=1)) == 0
        assert deletes == [0]
        assert await markers(store) == 3

    async def test_a_naive_cutoff_is_refused(self, store: Store) -> None:
        """A cutoff without a time zone is ambiguous: ValueError, nothing deleted."""
        await add_markers(store, OLD, 1, "/old")
        with pytest.raises(ValueError, match="timezone-aware"):
            await prune_processed(store, datetime.now() - timedelta(hours=1))
        assert await markers(store) == 1


class TestPruningBesideTheWorker:
    async def test_pruner_removes_expired_markers_logs_and_counts_them(self, store: Store, database_url: str) -> None:
        """Every interval expired markers are deleted, logged as processed_markers_pruned and counted in the metric."""
        await add_markers(store, OLD, 6, "/old")
        await add_markers(store, RECENT, 2, "/recent")
        observer = fresh_observer()
        with capture_logs() as logs:
            async with pruning(store, settings(database_url), observer):
                await wait_until(lambda: pruned_total(observer) == 6, 10, interval=0.05, what="the metric to count 6")
        assert (await markers(store, "/old"), await markers(store, "/recent")) == (0, 2)
        pruned = [e for e in logs if e["event"] == "processed_markers_pruned"]
        assert pruned[0]["count"] == 6
        assert datetime.fromisoformat(pruned[0]["cutoff"]) < datetime.now(UTC) - timedelta(minutes=59)

    async def test_zero_retention_keeps_markers_forever(self, store: Store, database_url: str) -> None:
        """processed_retention_hours 0 starts no pruner: even markers years old stay."""
        await add_markers(store, timedelta(days=1000), 3, "/ancient")
        with capture_logs() as logs:
            async with pruning(store, settings(database_url, retention_hours=0, interval_s=0.01)):
                await asyncio.sleep(0.3)
        assert await markers(store) == 3
        assert not [e for e in logs if e["event"].startswith("processed_")]

    async def test_a_database_error_is_logged_and_retried_next_interval(self, database_url: str) -> None:
        """A round that fails (no table yet) logs processed_prune_failed; the pruner goes on, and prunes once the table is there."""
        store = Store.from_settings(settings(database_url))
        observer = fresh_observer()
        try:
            with capture_logs() as logs:
                async with pruning(store, settings(database_url), observer):
                    await wait_until(
                        lambda: [e for e in logs if e["event"] == "processed_prune_failed"], 10, interval=0.05, what="a failed round"
                    )
                    await store.upgrade()
                    await add_markers(store, OLD, 4, "/old")
                    await wait_until(lambda: pruned_total(observer) == 4, 10, interval=0.05, what="a round after the failure")
            failed = next(e for e in logs if e["event"] == "processed_prune_failed")
            assert failed["error_type"] == "PersistenceError"
            assert "pruning processed-event markers" in failed["reason"]
            assert await markers(store) == 0
        finally:
            await store.close()


class TestPruneCommand:
    async def test_db_prune_removes_markers_past_the_configured_retention(self, store: Store, database_url: str) -> None:
        """`rc-worker db prune` deletes markers older than persistence.processed_retention_hours and prints how many."""
        await add_markers(store, OLD, 5, "/old")
        await add_markers(store, RECENT, 2, "/recent")
        result = rc_worker("db", "prune", env=cli_env(database_url, RC_WORKER_PERSISTENCE__PROCESSED_RETENTION_HOURS="24"))
        assert result.stdout.startswith("removed 5 processed-event markers older than 24 hours")
        assert (await markers(store, "/old"), await markers(store, "/recent")) == (0, 2)

    async def test_older_than_hours_overrides_the_configured_retention(self, sqlite_url: str) -> None:
        """Markers two days old survive the default week, and go with --older-than-hours 24."""
        async with store_for(sqlite_url) as store:
            await add_markers(store, OLD, 3, "/old")
            by_default = rc_worker("db", "prune", env=cli_env(sqlite_url))
            assert by_default.stdout.startswith("removed 0 processed-event markers older than 168 hours")
            assert await markers(store) == 3
            overridden = rc_worker("db", "prune", "--older-than-hours", "24", env=cli_env(sqlite_url))
            assert overridden.stdout.startswith("removed 3 processed-event markers older than 24 hours")
            assert await markers(store) == 0

    async def test_db_prune_with_zero_retention_removes_nothing(self, sqlite_url: str) -> None:
        """processed_retention_hours 0 means keep forever: the command says so and deletes nothing."""
        async with store_for(sqlite_url) as store:
            await add_markers(store, timedelta(days=1000), 2, "/ancient")
            result = rc_worker("db", "prune", env=cli_env(sqlite_url, RC_WORKER_PERSISTENCE__PROCESSED_RETENTION_HOURS="0"))
            assert "keep forever" in result.stdout
            assert await markers(store) == 2


class TestSettings:
    @pytest.mark.parametrize("key", ["processed_retention_hours", "prune_interval_s"])
    def test_a_negative_value_stops_start_up_naming_the_key(self, sqlite_url: str, key: str) -> None:
        """`rc-worker run` with a negative retention key exits 2 naming the key and its variable."""
        variable = f"RC_WORKER_PERSISTENCE__{key.upper()}"
        result = rc_worker("run", env=cli_env(sqlite_url, **{variable: "-1"}), check=False, timeout=60)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"persistence.{key} (env {variable})" in result.stderr
        assert "greater than or equal to 0" in result.stderr


@pytest.mark.kafka
class TestRunningWorker:
    async def test_a_running_worker_prunes_expired_markers_and_keeps_its_own(
        self, topics: TopicSet, sqlite_url: str, start_worker: StartWorker, tmp_path: Path
    ) -> None:
        """With a 1-hour retention, a worker deletes markers 2 days old put there before it started, and keeps those it writes."""
        async with store_for(sqlite_url) as store:
            await add_markers(store, OLD, 25, "/old")
        events = tmp_path / "events.jsonl"
        totals = make_events(events, count=30, rooms=3, seed=7)
        env: Mapping[str, str] = topics.env(
            sqlite_url, RC_WORKER_PERSISTENCE__PROCESSED_RETENTION_HOURS="1", RC_WORKER_PERSISTENCE__PRUNE_INTERVAL_S="0.5"
        )
        rc_worker("load", str(events), env=env)
        worker = start_worker(env, "worker")
        async with store_for(sqlite_url) as store:

            async def done() -> bool:
                return await markers(store, "/old") == 0 and await store.processed_count("message-count") == totals["events"]

            await wait_until(done, 30, what="old markers pruned and every event processed")
        assert worker.terminate() == 0
        pruned = worker.events("processed_markers_pruned")
        assert sum(e["count"] for e in pruned) == 25
        assert not worker.events("processed_prune_failed")
