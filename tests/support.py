"""Helpers shared by the tests: worker subprocesses, topic sets, contract files, waiting."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from worker.config import KafkaSettings, PersistenceSettings
from worker.persistence.store import Store

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(message: str) -> None:
    """A service a test needs is missing: skip on a developer's machine, fail in CI (CI=true)."""
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service fails the run)")
    pytest.skip(message)


FIXTURES = ROOT / "tests" / "fixtures"
RC_WORKER = [sys.executable, "-m", "worker"]


@dataclass(frozen=True)
class Services:
    """Where the real services listen."""

    kafka: str


@dataclass(frozen=True)
class TopicSet:
    """One test's own topics and consumer group."""

    bootstrap: str
    topic: str
    dead_letter_topic: str
    commands_topic: str
    group_id: str

    def kafka_settings(self, **overrides: Any) -> KafkaSettings:
        """KafkaSettings pointing at these topics."""
        return KafkaSettings(
            bootstrap_servers=self.bootstrap,
            topic=self.topic,
            dead_letter_topic=self.dead_letter_topic,
            commands_topic=self.commands_topic,
            group_id=self.group_id,
            **overrides,
        )

    def env(self, database_url: str, **extra: str) -> dict[str, str]:
        """Environment for an `rc-worker` subprocess using these topics and ``database_url``."""
        env = {
            **os.environ,
            "RC_WORKER_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "RC_WORKER_KAFKA__TOPIC": self.topic,
            "RC_WORKER_KAFKA__DEAD_LETTER_TOPIC": self.dead_letter_topic,
            "RC_WORKER_KAFKA__COMMANDS_TOPIC": self.commands_topic,
            "RC_WORKER_KAFKA__GROUP_ID": self.group_id,
            "RC_WORKER_PERSISTENCE__URL": database_url,
            "RC_WORKER_LOGGING__FORMAT": "json",
            # Tests follow processing by its per-batch lines (batch_committed), logged at debug.
            "RC_WORKER_LOGGING__LEVEL": "debug",
            "RC_WORKER_CONFIG": str(ROOT / "config.yaml"),
            # Short sessions so a killed worker's partitions move on quickly in tests.
            "RC_WORKER_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "RC_WORKER_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            # Several workers (and several test runs) share this host: each picks a free port.
            "RC_WORKER_OBSERVABILITY__PORT": "0",
        }
        env.update(extra)
        return env


def rc_worker(*args: str, env: Mapping[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run an `rc-worker` command to completion."""
    result = subprocess.run([*RC_WORKER, *args], env=dict(env), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"rc-worker {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def on_terminal(command: Sequence[str], env: Mapping[str, str], timeout: float = 120, columns: int = 160) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as its stdin, stdout and stderr; its exit status and all it wrote."""
    master, child = pty.openpty()
    # A terminal of known width: the progress bar sizes itself to it.
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
    process = subprocess.Popen(list(command), env=dict(env), stdin=child, stdout=child, stderr=child, cwd=ROOT)
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"{' '.join(command)} still ran after {timeout}s; it wrote:\n{b''.join(chunks)[-2000:]!r}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has closed it
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return process.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


StartWorker = Callable[..., "WorkerProcess"]  # (env, name[, command]) -> a started process


@dataclass
class WorkerProcess:
    """An `rc-worker run` (or ``command``) subprocess whose JSON log lines are kept in a file."""

    env: Mapping[str, str]
    log_path: Path
    command: str = "run"
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> WorkerProcess:
        """Start it (again)."""
        handle = self.log_path.open("ab")
        self.process = subprocess.Popen([*RC_WORKER, self.command], env=dict(self.env), stdout=handle, stderr=handle, cwd=ROOT)
        handle.close()
        return self

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM, and wait for the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def alive(self) -> bool:
        """Whether it is still running."""
        return self.process is not None and self.process.poll() is None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines written so far (optionally only those with event == name)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            if name is None or item.get("event") == name:
                found.append(item)
        return found


def load_events(events: Sequence[Mapping[str, Any]], path: Path, env: Mapping[str, str]) -> None:
    """Write structured-mode CloudEvents as a contract file keyed by room, migrate, and load it."""
    lines = [
        json.dumps({"key": e["data"]["room"]["id"], "headers": {"content-type": "application/cloudevents+json"}, "value": json.dumps(e)})
        for e in events
    ]
    path.write_text("\n".join(lines) + "\n")
    rc_worker("db", "upgrade", env=env)
    rc_worker("load", str(path), env=env)


def make_events(path: Path, **options: Any) -> dict[str, Any]:
    """Write contract records with the generator in tests/fixtures; returns its expected totals."""
    expect = path.with_suffix(".expect.json")
    args = [sys.executable, str(FIXTURES / "make_events.py"), "--expect", str(expect)]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    with path.open("w") as out:
        subprocess.run(args, stdout=out, check=True, timeout=300)
    totals: dict[str, Any] = json.loads(expect.read_text())
    return totals


async def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.5, what: str = "condition") -> Any:  # noqa: ASYNC109 - a deadline, reported with what was awaited
    """Poll ``predicate`` (sync or async) until it returns something truthy; bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextlib.asynccontextmanager
async def store_for(url: str) -> AsyncIterator[Store]:
    """A store on ``url`` with the schema migrated; closed afterwards."""
    store = Store.from_settings(PersistenceSettings(url=url))  # type: ignore[arg-type]
    await store.upgrade()
    try:
        yield store
    finally:
        await store.close()


async def counts(url: str, app: str = "message-count") -> dict[str, int]:
    """Every counter of the message-count app: {"misc:message-count": N, "room:r0001": n, ...}."""
    async with store_for(url) as store:
        records = await store.app_records(app)
    found: dict[str, int] = {}
    for record in records:
        data = json.loads(record.data)
        for association in record.associations:
            found[association] = found.get(association, 0) + data["count"]
    return found


def expected_counts(totals: Mapping[str, Any]) -> dict[str, int]:
    """The counters a correct worker ends with, from the generator's expected totals."""
    expected = {"misc:message-count": totals["events"]}
    expected.update({f"room:{room}": n for room, n in totals["rooms"].items()})
    return expected


async def create_postgres_database(admin_url: str) -> str:
    """Create a fresh database next to ``admin_url``'s; returns its URL."""
    import asyncpg

    url = make_url(admin_url)
    name = f"rct_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(user=url.username, password=url.password, host=url.host, port=url.port, database=url.database)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


async def drop_postgres_database(admin_url: str, url: str) -> None:
    """Drop a database made by :func:`create_postgres_database`."""
    import asyncpg

    admin = make_url(admin_url)
    name = make_url(url).database
    conn = await asyncpg.connect(user=admin.username, password=admin.password, host=admin.host, port=admin.port, database=admin.database)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def write_distribution(directory: Path, name: str, entry_points: Mapping[str, str], modules: Mapping[str, str] = {}) -> Path:
    """An installed-looking distribution in ``directory``: a dist-info with rc_worker.handlers entry
    points, and module files. Put ``directory`` on sys.path (or PYTHONPATH) and importlib.metadata
    finds it as it finds pip-installed ones."""
    directory.mkdir(parents=True, exist_ok=True)
    dist_info = directory / f"{name.replace('-', '_')}-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{app_id} = {target}\n" for app_id, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[rc_worker.handlers]\n{lines}")
    for module, source in modules.items():
        (directory / f"{module}.py").write_text(source)
    return directory
