"""The local broker and PostgreSQL the benchmark runs on, and its throwaway databases.

As the test fixtures do, it uses KAFKA_BOOTSTRAP_SERVERS / RC_WORKER_TEST_POSTGRES_URL when
set and otherwise starts the project's own services (docker/local/*.sh, idempotent).
"""

from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from worker.config import PersistenceSettings
from worker.persistence.store import Store

ROOT = Path(__file__).resolve().parent.parent


class ServiceError(RuntimeError):
    """Raised when the broker or PostgreSQL cannot be had."""


@dataclass(frozen=True, slots=True)
class Services:
    """Where the broker listens, and PostgreSQL's admin URL (None: PostgreSQL skipped)."""

    kafka: str
    postgres_admin: str | None


def _start(script: str) -> str:
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "local" / script), "start"], capture_output=True, text=True, timeout=600, check=False
    )
    if result.returncode != 0:
        raise ServiceError(f"docker/local/{script} start exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1]


def find_services(*, postgres: bool) -> Services:
    """The running services, started if need be."""
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or _start("kafka.sh")
    admin = None
    if postgres:
        admin = os.environ.get("RC_WORKER_TEST_POSTGRES_URL") or _start("postgres.sh")
    return Services(kafka, admin)


async def create_postgres_database(admin_url: str) -> str:
    """A fresh database next to ``admin_url``'s; returns its URL."""
    url = make_url(admin_url)
    name = f"bench_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(user=url.username, password=url.password, host=url.host, port=url.port, database=url.database)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


async def drop_postgres_database(admin_url: str, url: str) -> None:
    """Drop a database made by :func:`create_postgres_database`."""
    admin = make_url(admin_url)
    name = make_url(url).database
    conn = await asyncpg.connect(user=admin.username, password=admin.password, host=admin.host, port=admin.port, database=admin.database)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def open_store(url: str) -> Store:
    """A store on ``url`` (the benchmark's reads: progress and final counters)."""
    return Store.from_settings(PersistenceSettings(url=SecretStr(url)))


async def migrate(url: str) -> None:
    """Create the schema on a fresh database, as `rc-worker db upgrade` does."""
    store = open_store(url)
    try:
        await store.upgrade()
    finally:
        await store.close()
