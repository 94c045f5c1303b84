"""What the pipeline tells its watchers: the dispatcher's hooks, and each lane's state through Status.

Over a real SQLite store; no broker is needed (the worker's Kafka clients are created, never started).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.support import store_for, wait_until
from worker import App, Message, plugins
from worker.apps.http import Http
from worker.config import Settings
from worker.errors import AppError, PersistenceError
from worker.events import RawRecord
from worker.persistence.store import Fence, Store
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.pipeline.hooks import Hooks
from worker.pipeline.lane import Lane
from worker.pipeline.runner import Worker
from worker.testing import TEST_PROCESSING, message
from worker.testing.builders import file_records


class Recorder(Hooks):
    """Writes down what the dispatcher reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def handler_failed(self, app_id: str, exc: Exception, attempt: int, retrying: bool) -> None:
        self.calls.append(("handler_failed", app_id, type(exc).__name__, attempt, retrying))

    def dead_lettered(self, app_id: str | None, count: int) -> None:
        self.calls.append(("dead_lettered", app_id, count))


class FailsOnBoom(App):
    """Raises on every message whose text is "boom"."""

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        if message.text == "boom":
            raise AppError("boom")


def records(texts: list[str], start: int = 0) -> list[RawRecord]:
    """Valid PostMessageSent records with these texts, on partition 0 of topic t."""
    items = file_records([message(text) for text in texts])
    return [RawRecord("t", 0, start + n, 0, item.key, item.value, item.headers) for n, item in enumerate(items)]


async def claimed(store: Store) -> Fence:
    claims = await store.claim("g", "t", [0], owner="test")
    return claims[0].fence


class TestDispatcherHooks:
    async def test_failures_and_committed_dead_letters_are_reported(self, sqlite_url: str) -> None:
        """Each failed run is reported with its attempt; dead letters once their commit succeeded, per app or whole records."""
        app = plugins.instantiate(FailsOnBoom, "fails", {})
        hooks = Recorder()
        invalid = RawRecord("t", 0, 2, 0, b"k", b"not json", ())
        async with store_for(sqlite_url) as store:
            http = Http(Settings().http)
            try:
                dispatcher = Dispatcher([app], store, http, Topics("t.dlq", "t.cmd"), TEST_PROCESSING, hooks)
                result = await dispatcher.dispatch([*records(["fine", "boom"]), invalid], await claimed(store))
            finally:
                await http.aclose()
        assert (result.processed, result.dead_lettered) == (2, 1)
        assert hooks.calls == [
            ("handler_failed", "fails", "AppError", 1, True),
            ("handler_failed", "fails", "AppError", 2, True),
            ("handler_failed", "fails", "AppError", 3, False),
            ("dead_lettered", "fails", 1),
            ("dead_lettered", None, 1),
        ]


class FlakyDatabase(App):
    """Raises a database error naming a URL with a password on its first two runs, then waits until released."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0
        self.release = asyncio.Event()

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        self.runs += 1
        if self.runs <= 2:
            raise PersistenceError("cannot reach postgresql://rc:hunter2@db.internal/rc")
        await self.release.wait()


class NoOutbox:
    """Stands in for the outbox publisher: these batches stage nothing to publish."""

    async def publish(self, fence: Fence) -> int:
        return 0


class TestLaneStatus:
    async def test_a_retrying_lane_shows_its_attempt_and_redacted_error_until_it_commits(self, sqlite_url: str, tmp_path: Path) -> None:
        """Status.lanes() reports busy, the retry count and the last error without the password, then progress."""
        async with store_for(sqlite_url):
            pass  # migrated
        app = plugins.instantiate(FlakyDatabase, "flaky", {})
        worker = Worker(Settings(persistence={"url": sqlite_url}, processing=TEST_PROCESSING.model_dump()), [app])
        status = worker.status
        lane = Lane(await claimed(worker.store), worker.dispatcher, NoOutbox(), worker.offsets, TEST_PROCESSING, lambda _: None, print)  # type: ignore[arg-type]
        worker.lanes[0] = lane
        started = lane.last_progress
        try:
            lane.submit(records(["hello"]))
            await wait_until(lambda: app.runs >= 3, 10, interval=0.05, what="a third run of the handler")
            [during] = status.lanes()
            assert (during.partition, during.busy, during.attempt) == (0, True, 2)
            assert during.last_error is not None
            assert during.last_error.startswith("PersistenceError: ")
            assert "hunter2" not in during.last_error
            assert "db.internal" in during.last_error
            app.release.set()
            await wait_until(lambda: not lane.busy, 10, interval=0.05, what="the batch committed")
            [after] = status.lanes()
            assert (after.busy, after.attempt) == (False, 0)
            assert lane.last_progress > started  # the commit is the lane's latest progress
            assert (status.owner, status.topic) == (worker.owner, worker.consumer.topic)
        finally:
            await lane.close(5)
            await worker.consumer.stop()
            await worker.producer.__aexit__(None, None, None)
            await worker.reader.__aexit__(None, None, None)
            await worker.http.aclose()
            await worker.store.close()
