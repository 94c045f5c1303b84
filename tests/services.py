"""A broker and a PostgreSQL cluster of the test session's own, which fault tests may stop.

The shared services (Kafka on :9092, PostgreSQL on :5432) must never go down under other
tests, so outages are played on these: started by the same scripts on other ports, once
per session, and wiped at its end. The broker also has a SASL listener (KAFKA_SASL=1).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import ROOT, unavailable

SCRIPTS = ROOT / "docker" / "local"

SASL_USER = "rcworker"
SASL_PASSWORD = "own-broker-Secr3t"  # noqa: S105 - a test broker's; unique, so a leak of it is easy to find


def _script(name: str, command: str, env: dict[str, str], timeout: float) -> str:
    """Run a service script; returns the last line of its stdout."""
    # A developer's KAFKA_BOOTSTRAP_SERVERS would make kafka.sh skip starting anything.
    clean = {k: v for k, v in os.environ.items() if k not in {"KAFKA_BOOTSTRAP_SERVERS", "PGPORT", "RC_PG_DATA"}}
    result = subprocess.run(
        ["bash", str(SCRIPTS / name), command], env={**clean, **env}, capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{name} {command} exited {result.returncode}: {result.stderr[-2000:]}")
    lines = result.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def free_ports(low: int, high: int, count: int) -> int:
    """The first of ``count`` consecutive free loopback ports in [low, high), picked at random.

    Two test sessions on one machine (engineers, CI jobs) then never stop each other's
    broker or database.
    """
    candidates = list(range(low, high - count, count))
    random.shuffle(candidates)
    for first in candidates[:200]:
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports between {low} and {high}")


def _unavailable(what: str, exc: Exception) -> None:
    unavailable(f"{what} of the test session's own could not be started: {exc}")


@dataclass
class OwnKafka:
    """A single-node broker: PLAINTEXT on ``port``, its controller on +1, SASL_PLAINTEXT on +2."""

    port: int
    restarts: int = field(default=0, init=False)

    @property
    def bootstrap(self) -> str:
        """The PLAINTEXT address."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT address (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 for SASL_USER)."""
        return f"127.0.0.1:{self.port + 2}"

    def _env(self) -> dict[str, str]:
        return {
            "KAFKA_PORT": str(self.port),
            "KAFKA_SASL": "1",
            "KAFKA_SASL_USER": SASL_USER,
            "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
            # C1 only: starts in half the time, and a test broker needs no peak throughput.
            "KAFKA_OPTS": "-XX:TieredStopAtLevel=1",
        }

    def start(self) -> None:
        """Start it (a no-op when it runs); waits until it serves requests."""
        _script("kafka.sh", "start", self._env(), timeout=300)

    def stop(self) -> None:
        """Stop it, keeping its data (a broker outage)."""
        _script("kafka.sh", "stop", self._env(), timeout=120)

    def restart(self) -> None:
        """Stop it and start it again, data kept."""
        self.stop()
        self.start()
        self.restarts += 1

    def wipe(self) -> None:
        """Stop it and delete its data."""
        _script("kafka.sh", "stop", {**self._env(), "KAFKA_WIPE": "1"}, timeout=120)


@dataclass
class OwnPostgres:
    """A PostgreSQL cluster on POSTGRES_PORT in a directory of its own."""

    data: Path
    port: int
    admin_url: str = ""

    def _env(self, **extra: str) -> dict[str, str]:
        return {"PGPORT": str(self.port), "RC_PG_DATA": str(self.data), **extra}

    def start(self) -> str:
        """Start it (a no-op when it runs); returns the URL of its default database."""
        self.admin_url = _script("postgres.sh", "start", self._env(), timeout=300)
        return self.admin_url

    def stop(self, mode: str = "fast") -> None:
        """Stop it, data kept; ``mode`` "immediate" is a crash (recovery at the next start)."""
        _script("postgres.sh", "stop", self._env(PG_STOP_MODE=mode), timeout=120)

    def wipe(self) -> None:
        """Stop it and delete the cluster."""
        _script("postgres.sh", "stop", self._env(PG_WIPE="1", PG_STOP_MODE="immediate"), timeout=120)


@pytest.fixture(scope="session")
def _own_kafka_session() -> Iterator[OwnKafka]:
    broker = OwnKafka(free_ports(19200, 19900, 3))
    try:
        broker.wipe()  # whatever an aborted session left on this port
        broker.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        _unavailable("a Kafka broker", exc)
    yield broker
    broker.wipe()


@pytest.fixture
def own_kafka(_own_kafka_session: OwnKafka) -> OwnKafka:
    """The session's own broker, running (a test before may have stopped it)."""
    _own_kafka_session.start()
    return _own_kafka_session


@pytest.fixture(scope="session")
def _own_postgres_session() -> Iterator[OwnPostgres]:
    # Not under pytest's tmp dir: as root the server runs as `postgres`, which must reach it.
    base = Path(tempfile.mkdtemp(prefix="rc-worker-own-pg-"))
    base.chmod(0o755)
    cluster = OwnPostgres(base / "cluster", free_ports(15400, 15900, 1))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(base, ignore_errors=True)
        _unavailable("a PostgreSQL cluster", exc)
    yield cluster
    cluster.wipe()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_postgres(_own_postgres_session: OwnPostgres) -> OwnPostgres:
    """The session's own PostgreSQL cluster, running (a test before may have stopped it)."""
    _own_postgres_session.start()
    return _own_postgres_session
