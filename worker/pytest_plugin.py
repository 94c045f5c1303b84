"""Fixtures for handler authors' own test suites: a broker, a topic loaded from a file, a replay.

Registered through the ``pytest11`` entry point, so installing rc-apps-worker makes them
available in every test suite (``-p no:rc_worker`` turns them off)::

    def test_incident_42(rc_topic_from_file, rc_replay):
        topic = rc_topic_from_file("tests/fixtures/incident-42.jsonl")
        result = rc_replay(topic, handlers=["message-count"])
        assert result.data("message-count", "misc:message-count") == [{"count": 17}]

``rc_kafka`` is ``KAFKA_BOOTSTRAP_SERVERS``, else a broker listening on 127.0.0.1:9092, else
the one the project's ``docker/local/kafka.sh`` starts; without any, the tests that use it
skip, or fail when ``CI`` is set. The factories are plain functions, usable from sync and
async tests alike; every topic and database they make is the test's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import pytest

if TYPE_CHECKING:  # importing the worker costs seconds: only the fixtures in use pay for it
    from worker.tools.replay import ReplaySummary

_T = TypeVar("_T")
LOCAL_BROKER = ("127.0.0.1", 9092)


@dataclass(frozen=True, slots=True)
class ReplayedRecord:
    """One record a replay left in the database."""

    app: str
    id: str
    associations: tuple[str, ...]
    data: dict[str, Any]
    version: int


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What ``rc_replay`` returns: the replay's summary and every record of the chosen apps."""

    summary: ReplaySummary
    records: list[ReplayedRecord]
    database_url: str

    def of(self, app: str) -> list[ReplayedRecord]:
        """The records of ``app``."""
        return [r for r in self.records if r.app == app]

    def data(self, app: str, association: str | None = None) -> list[dict[str, Any]]:
        """The data of ``app``'s records (with ``association``, e.g. ``"room:r1"``, if given)."""
        return [r.data for r in self.of(app) if association is None or association in r.associations]


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coroutine`` to completion, from a sync test or from inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    # An async test's loop is busy running the test: use a loop of our own in a thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


@pytest.fixture(scope="session")
def rc_kafka(pytestconfig: pytest.Config) -> str:
    """The bootstrap address of a real Kafka broker."""
    named = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if named:
        return named
    if _listening(*LOCAL_BROKER):
        return "{}:{}".format(*LOCAL_BROKER)
    script = pytestconfig.rootpath / "docker" / "local" / "kafka.sh"
    detail = f"KAFKA_BOOTSTRAP_SERVERS is not set, nothing listens on 127.0.0.1:9092, and there is no {script}"
    if script.exists():
        result = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=600, check=False)  # noqa: S603, S607
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.strip().splitlines()[-1]
        detail = f"{script} start exited {result.returncode}: {result.stderr[-1000:]}"
    if _in_ci():
        pytest.fail(f"no Kafka broker for rc_kafka: {detail} (CI is set: a missing broker fails the run)")
    pytest.skip(f"no Kafka broker for rc_kafka: {detail}")


def _settings(bootstrap: str, topic: str, database_url: str = "sqlite+aiosqlite:///unused.db", **handlers: Any) -> Any:
    # model_construct: the test names every value; RC_WORKER_* variables of the environment
    # (which pydantic-settings would prefer) must not redirect it to another topic or database.
    from worker.config import HandlerSettings, KafkaSettings, PersistenceSettings, Settings

    kafka = KafkaSettings(
        bootstrap_servers=bootstrap, topic=topic, dead_letter_topic=f"{topic}.dlq", commands_topic=f"{topic}.cmd", group_id=f"g-{topic}"
    )
    persistence = PersistenceSettings.model_validate({"url": database_url})
    return Settings.model_construct(kafka=kafka, persistence=persistence, handlers=HandlerSettings(**handlers))


@pytest.fixture
def rc_topic_from_file(rc_kafka: str) -> Callable[..., str]:
    """A factory: ``rc_topic_from_file(path, partitions=6)`` loads a contract JSON-lines file into a fresh topic; returns its name."""

    def load(path: str | os.PathLike[str], partitions: int = 6) -> str:
        from worker.kafka import Outgoing, Producer, create_topics
        from worker.tools.dump import read_records_file

        records = read_records_file(Path(path))
        topic = f"rc-test-{uuid.uuid4().hex[:12]}"
        settings = _settings(rc_kafka, topic)

        async def produce() -> None:
            await create_topics(settings.kafka, partitions)
            async with Producer(settings.kafka) as producer:
                await producer.send_many([Outgoing(topic, r.key, r.value, r.headers) for r in records])

        _run(produce())
        return topic

    return load


@pytest.fixture
def rc_replay(rc_kafka: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ReplayResult]:
    """A factory: ``rc_replay(topic, handlers=[...], settings={app: {...}})`` replays a whole topic into a throwaway SQLite database."""

    def replay(
        topic: str, handlers: Sequence[str] = ("message-count",), settings: Mapping[str, Mapping[str, Any]] | None = None
    ) -> ReplayResult:
        from worker.plugins import load_apps
        from worker.tools.common import state_store
        from worker.tools.replay import Replay

        url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('rc-replay') / 'state.db'}"
        config = _settings(rc_kafka, topic, url, enabled=tuple(handlers), settings=dict(settings or {}))
        apps = load_apps(config.handlers.enabled, config.handlers.settings)

        async def run() -> ReplayResult:
            store = state_store(url)
            try:
                summary = await Replay(config, apps, store).run()
                records = [
                    ReplayedRecord(app.id, r.id, r.associations, orjson.loads(r.data), r.version)
                    for app in apps
                    for r in await store.app_records(app.id)
                ]
            finally:
                await store.close()
            return ReplayResult(summary, records, url)

        return _run(run())

    return replay
