"""Fixtures for the real services: a Kafka broker, PostgreSQL, throwaway databases and topics.

Services are started by the project's own scripts (docker/local/*.sh) unless
KAFKA_BOOTSTRAP_SERVERS / RC_WORKER_TEST_POSTGRES_URL name running ones. When a service
cannot be had, its tests skip on a developer's machine and fail in CI (CI=true).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaError

from tests.services import _own_kafka_session, _own_postgres_session, own_kafka, own_postgres  # noqa: F401 - fixtures
from tests.support import (
    IN_CI,
    ROOT,
    Services,
    StartWorker,
    TopicSet,
    WorkerProcess,
    create_postgres_database,
    drop_postgres_database,
    unavailable,
)
from worker.config import KafkaSettings
from worker.errors import BrokerError
from worker.kafka import create_topics
from worker.kafka.admin import admin
from worker.persistence.store import Store


def _unavailable(what: str, detail: str) -> None:
    unavailable(f"{what} is not available: {detail}")


def _start(script: str) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "local" / script), "start"], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script} start exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The bootstrap address of a real Kafka broker."""
    named = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if named:
        return named
    try:
        return _start("kafka.sh")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        _unavailable("Kafka", str(exc))
        raise


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """A SQLAlchemy URL of a real PostgreSQL database whose user may create databases."""
    named = os.environ.get("RC_WORKER_TEST_POSTGRES_URL")
    if named:
        return named
    try:
        return _start("postgres.sh")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        _unavailable("PostgreSQL", str(exc))
        raise


@pytest.fixture
def services(kafka_bootstrap: str) -> Services:
    """Addresses of the running services."""
    return Services(kafka_bootstrap)


@pytest.fixture
async def topics(kafka_bootstrap: str) -> AsyncIterator[TopicSet]:
    """A fresh event topic (6 partitions) with its dead-letter and commands topics, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    topic_set = TopicSet(kafka_bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
    await create_topics(topic_set.kafka_settings(), partitions=6)
    yield topic_set
    await _delete_topics_named(topic_set.kafka_settings(), name)


async def _delete_topics_named(settings: KafkaSettings, prefix: str) -> None:
    # A suite leaves thousands of partitions behind otherwise, and a broker that loads them
    # all at start-up runs out of heap: the shared broker outlives every test session.
    # Hygiene, not a behaviour under test: a broker that is gone by now is no failure.
    with contextlib.suppress(BrokerError, KafkaError, OSError, TimeoutError):
        async with admin(settings, timeout_s=10) as client:
            names = [t for t in await client.list_topics() if t == prefix or t.startswith(f"{prefix}.")]
            if names:
                await asyncio.wait_for(client.delete_topics(names), timeout=10)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite database file of this test's own."""
    return f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def postgres_url(postgres_admin_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database of this test's own, dropped afterwards."""
    url = asyncio.run(create_postgres_database(postgres_admin_url))
    yield url
    asyncio.run(drop_postgres_database(postgres_admin_url, url))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: a fresh SQLite file, then a fresh PostgreSQL database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    url: str = request.getfixturevalue(fixture)
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated store on each backend."""
    from tests.support import store_for

    async with store_for(database_url) as migrated:
        yield migrated


__all__ = ["IN_CI", "KafkaSettings"]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Start `rc-worker run` (or another command's) processes; any still running at the end is killed."""
    started: list[WorkerProcess] = []

    def start(env: dict[str, str] | Any, name: str, command: str = "run") -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"{name}.log", command).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.alive():
            worker.kill()
