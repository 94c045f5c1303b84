"""`rc-worker run` scenarios: real CLI subprocesses over a topic, a fresh group and a fresh database.

A run is done when the database's global counter (``misc:message-count``, which every
processed event increments) reaches the number of events, or when it has run for its cap
(so a slow path cannot stretch the benchmark); the rate is taken from the first poll that
sees anything processed to the last poll, so interpreter start-up and joining the group are
not counted (the rebalances while several workers join are). Then the workers get SIGTERM,
their peak RSS is read from /proc, and every counter is compared with those of the records
below the partition offsets stored with the state: all of them unless the run was capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from bench.dataset import ROOT, TOTAL, Layout, Topic
from bench.report import Result
from bench.services import Services, create_postgres_database, drop_postgres_database, migrate, open_store
from worker.persistence.store import Store

APP = "message-count"
MENTIONS = "mentions"
# Seconds between two reads of the global counter while a scenario runs.
POLL_S = 0.05
# The worker's counter of database round trips (statements, BEGIN and COMMIT) on /metrics.
ROUND_TRIPS_METRIC = "rc_worker_db_round_trips_total"
# Units of work committed: each commit is one, however many partitions' batches it holds.
UNITS_METRIC = 'rc_worker_commit_duration_seconds_count{outcome="committed"}'
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ScenarioError(RuntimeError):
    """Raised when a scenario cannot finish: a worker died, or progress stalled."""


@dataclass(slots=True)
class WorkerProcess:
    """One `rc-worker run` subprocess, its JSON log lines kept in a file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    def peak_rss_mb(self) -> float | None:
        """VmHWM, the process's peak resident set size so far (Linux only)."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return None

    def cpu_s(self) -> float | None:
        """User plus system CPU seconds the process has used so far (Linux only)."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name (field 2) may hold spaces: split after its closing parenthesis.
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
        return None

    def metrics(self, names: Sequence[str]) -> dict[str, float | None]:
        """Each of ``names`` on one read of the worker's /metrics (summed over labels), or None where it serves none."""
        found: dict[str, float | None] = dict.fromkeys(names)
        listening = self.log_lines("observability_listening")
        if not listening:
            return found
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{listening[-1]['port']}/metrics", timeout=5) as response:
                lines = response.read().decode().splitlines()
        except OSError:
            return found
        for name in names:
            values = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((name + " ", name + "{"))]
            found[name] = sum(values) if values else None
        return found

    def log_lines(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (optionally only those named ``event``)."""
        found = []
        for line in self.log_path.read_bytes().splitlines():
            if not line.startswith(b"{"):
                continue
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if event is None or item.get("event") == event:
                found.append(item)
        return found

    def last_words(self) -> str:
        """Why it stopped: its last `rc-worker:` error line, else its last log line."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        said = [line for line in lines if line.startswith("rc-worker:")]
        return (said or lines or ["(no output)"])[-1][:500]


@dataclass(slots=True)
class Database:
    """A fresh database of one scenario: a SQLite file, or a PostgreSQL database dropped afterwards."""

    url: str
    backend: str
    admin_url: str | None = None


@contextlib.asynccontextmanager
async def fresh_database(backend: str, services: Services, workdir: Path) -> AsyncIterator[Database]:
    """A migrated, empty database on ``backend`` ("sqlite" or "postgres") for one scenario."""
    if backend == "sqlite":
        path = workdir / f"state-{uuid.uuid4().hex[:8]}.db"
        database = Database(f"sqlite+aiosqlite:///{path}", backend)
        await migrate(database.url)
        try:
            yield database
        finally:
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
        return
    if services.postgres_admin is None:
        raise ScenarioError("PostgreSQL was skipped (--skip-postgres)")
    url = await create_postgres_database(services.postgres_admin)
    try:
        await migrate(url)
        yield Database(url, backend, services.postgres_admin)
    finally:
        await drop_postgres_database(services.postgres_admin, url)


# The kafka settings a benchmark's worker takes from its topic (bench.dataset.Topic.settings).
_KAFKA_KEYS = ("bootstrap_servers", "topic", "dead_letter_topic", "commands_topic", "group_id")


def worker_env(topic: Topic, group_id: str, database_url: str, **extra: str) -> dict[str, str]:
    """The environment of an `rc-worker run` subprocess on ``topic`` for ``group_id``."""
    kafka = topic.settings(group_id)
    env = {
        **os.environ,
        "RC_WORKER_CONFIG": str(ROOT / "config.yaml"),
        **{f"RC_WORKER_KAFKA__{key.upper()}": str(getattr(kafka, key)) for key in _KAFKA_KEYS},
        "RC_WORKER_PERSISTENCE__URL": database_url,
        "RC_WORKER_HANDLERS__ENABLED": '["message-count"]',
        "RC_WORKER_LOGGING__FORMAT": "json",
        "RC_WORKER_LOGGING__LEVEL": "debug",  # the per-batch batch_committed lines, read for latencies
        # Several workers share this host: each serves /metrics on a port of its own.
        "RC_WORKER_OBSERVABILITY__PORT": "0",
    }
    env.update(extra)
    return env


def start_workers(count: int, env: Mapping[str, str], logdir: Path, label: str) -> list[WorkerProcess]:
    """Start ``count`` `rc-worker run` processes at once."""
    started = []
    for index in range(count):
        log_path = logdir / f"{label}-{index}.log"
        with log_path.open("wb") as handle:
            process = subprocess.Popen([sys.executable, "-m", "worker", "run"], env=dict(env), stdout=handle, stderr=handle, cwd=ROOT)
        started.append(WorkerProcess(process, log_path))
    return started


def stop_workers(workers: list[WorkerProcess], timeout_s: float = 60) -> list[int | None]:
    """SIGTERM each (still running) worker and wait; kill any that outlasts ``timeout_s``."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        try:
            codes.append(worker.process.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait(timeout=30)
            codes.append(None)
    return codes


async def global_count(store: Store) -> int:
    """The global counter in the database (0 before the first commit)."""
    return sum(orjson.loads(r.data)["count"] for r in await store.app_records(APP, TOTAL))


async def all_counters(store: Store) -> dict[str, int]:
    """Every counter of the message-count app: {"misc:message-count": N, "room:<id>": n, ...}."""
    found: dict[str, int] = {}
    for record in await store.app_records(APP):
        count = orjson.loads(record.data)["count"]
        for association in record.associations:
            found[association] = found.get(association, 0) + count
    return found


@dataclass(slots=True)
class Progress:
    """Polls of the global counter: when processing began, and where the scenario stopped.

    The workers' CPU time is sampled at the same two polls, so CPU per event covers the same
    span as the rate (interpreter start-up and joining the group left out).
    """

    first_at: float = 0.0
    first_count: int = 0
    done_at: float = 0.0
    done_count: int = 0
    capped: bool = False
    first_cpu_s: float | None = None
    done_cpu_s: float | None = None
    round_trips: float | None = None  # the workers' database round trips when the poll ended
    units: float | None = None  # the workers' units of work committed when the poll ended

    def rate(self) -> float | None:
        """Events/s from the first poll that saw progress to the last poll."""
        elapsed = self.done_at - self.first_at
        if elapsed <= 0 or self.done_count <= self.first_count:
            return None
        return (self.done_count - self.first_count) / elapsed

    def cpu_us_per_event(self) -> float | None:
        """The workers' user+system CPU microseconds per event processed between the two polls."""
        if self.first_cpu_s is None or self.done_cpu_s is None or self.done_count <= self.first_count:
            return None
        return (self.done_cpu_s - self.first_cpu_s) * 1e6 / (self.done_count - self.first_count)


def workers_cpu_s(workers: list[WorkerProcess]) -> float | None:
    """The CPU seconds all ``workers`` have used, or None if one cannot be read."""
    times = [w.cpu_s() for w in workers]
    return None if any(t is None for t in times) else sum(t for t in times if t is not None)


def workers_metrics(workers: list[WorkerProcess], names: Sequence[str]) -> dict[str, float | None]:
    """Each of ``names`` summed over every worker's /metrics, read once per worker; None unless every worker serves it."""
    read = [w.metrics(names) for w in workers]
    totals: dict[str, float | None] = {}
    for name in names:
        values = [found[name] for found in read]
        totals[name] = None if any(v is None for v in values) else sum(v for v in values if v is not None)
    return totals


async def wait_for_count(
    store: Store,
    total: int,
    workers: list[WorkerProcess],
    *,
    cap_s: float,
    start_s: float = 120,
    stall_s: float = 90,
    exits: bool = False,
) -> Progress:
    """Poll until the global counter reaches ``total``, or ``cap_s`` after processing began.

    ``exits``: the process stops by itself once done (a replay), so an exit after its last
    commit is the end, not a failure.

    Raises:
        ScenarioError: a worker exited, nothing was processed within ``start_s``, or the
            counter stood still for ``stall_s``.

    """
    progress = Progress()
    started = last_change = time.monotonic()
    last = -1
    while True:
        count = await global_count(store)
        now = time.monotonic()
        if count and not progress.first_at:
            progress.first_at, progress.first_count, progress.first_cpu_s = now, count, workers_cpu_s(workers)
        if count >= total or (progress.first_at and now - progress.first_at >= cap_s):
            progress.done_at, progress.done_count, progress.capped = now, count, count < total
            progress.done_cpu_s = workers_cpu_s(workers)
            # One read of each worker's counters, so the round trips and the units are of the same moment.
            counted = await asyncio.to_thread(workers_metrics, workers, (ROUND_TRIPS_METRIC, UNITS_METRIC))
            progress.round_trips, progress.units = counted[ROUND_TRIPS_METRIC], counted[UNITS_METRIC]
            return progress
        if count != last:
            last_change, last = now, count
        elif now - last_change > stall_s:
            raise ScenarioError(f"no progress for {stall_s:.0f} s at {count} of {total} events")
        if not progress.first_at and now - started > start_s:
            raise ScenarioError(f"nothing processed within {start_s:.0f} s of starting the workers")
        for worker in workers:
            if worker.process.poll() is not None and not (exits and await global_count(store) >= total):
                raise ScenarioError(f"a worker exited with status {worker.process.returncode} at {count} of {total}: {worker.last_words()}")
        await asyncio.sleep(POLL_S)


async def unread_mentions(store: Store) -> dict[tuple[str, str], int]:
    """{(username, room id): count} of every record the mentions app keeps."""
    found: dict[tuple[str, str], int] = {}
    for record in await store.app_records(MENTIONS):
        data = orjson.loads(record.data)
        found[(data["username"], data["roomId"])] = found.get((data["username"], data["roomId"]), 0) + data["count"]
    return found


async def check_counts(
    store: Store, layout: Layout, group_id: str | None, topic: str, *, complete: bool, mentions: bool = False
) -> tuple[bool, int]:
    """Whether the counters are exactly those of the records below the stored offsets; and how many.

    The workers have stopped; each committed its counters together with its partitions' next
    offsets, so any loss or double count shows as a difference. ``complete``: every record
    must also be below the stored offsets (``group_id`` None: no offsets are stored, all must
    be in). ``mentions``: the mentions app's records must also be those of that prefix.
    """
    stored = await store.stored_offsets(group_id, topic) if group_id is not None else None
    expected = layout.expected(stored)
    exact = await all_counters(store) == expected and (not complete or expected[TOTAL] == layout.total)
    if mentions:
        exact = exact and await unread_mentions(store) == layout.expected_mentions(stored)
    return exact, expected[TOTAL]


def latencies_ms(workers: list[WorkerProcess], sent_ms: Mapping[tuple[int, int], int]) -> list[float]:
    """Record timestamp -> database commit, per record, from the workers' batch_committed lines.

    Each line is logged right after its batch's commit; it carries the partition (bound by
    the lane), the batch's offsets and the log time.
    """
    found: list[float] = []
    for worker in workers:
        for line in worker.log_lines("batch_committed"):
            if "partition" not in line or "first_offset" not in line or "next_offset" not in line:
                continue
            committed_ms = datetime.fromisoformat(line["timestamp"]).timestamp() * 1000
            for offset in range(line["first_offset"], line["next_offset"]):
                sent = sent_ms.get((line["partition"], offset))
                if sent is not None:
                    found.append(committed_ms - sent)
    return found


@dataclass(slots=True)
class Scenario:
    """One `rc-worker run` scenario over a loaded topic."""

    name: str
    topic: Topic
    layout: Layout
    backend: str
    workers: int = 1
    cap_s: float = 60  # of processing, after which the workers are stopped and the rate taken
    handlers: tuple[str, ...] = (APP,)  # message-count first: the global counter tracks progress
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, group_id: str, database_url: str) -> dict[str, str]:
        """The workers' environment."""
        handlers = orjson.dumps(list(self.handlers)).decode()
        return worker_env(self.topic, group_id, database_url, RC_WORKER_HANDLERS__ENABLED=handlers, **self.extra_env)


Hook = Callable[[list[WorkerProcess]], Any]


async def run_scenario(scenario: Scenario, services: Services, workdir: Path, on_started: Hook | None = None) -> Result:
    """Run the scenario to the end or its cap and check its counters; failures are in the result, not raised."""
    started = time.monotonic()
    total = scenario.layout.total
    result = Result(scenario.name, total)
    workers: list[WorkerProcess] = []
    try:
        async with fresh_database(scenario.backend, services, workdir) as database:
            store = open_store(database.url)
            try:
                group = f"bench-{uuid.uuid4().hex[:8]}"
                env = scenario.env(group, database.url)
                label = scenario.name.replace(" ", "_").replace(",", "")
                workers = start_workers(scenario.workers, env, workdir, label)
                if on_started is not None:
                    on_started(workers)
                progress = await wait_for_count(store, total, workers, cap_s=scenario.cap_s)
                result.rate = progress.rate()
                result.peak_rss_mb = [m for m in (w.peak_rss_mb() for w in workers) if m is not None]
                codes = stop_workers(workers)
                result.exact, result.events = await check_counts(
                    store, scenario.layout, group, scenario.topic.name, complete=not progress.capped, mentions=MENTIONS in scenario.handlers
                )
                result.extra = {"exit_codes": codes, "capped": progress.capped, **batch_stats(workers), **cost(progress, workers)}
                if progress.capped and result.events < total:
                    result.note = f"capped at {scenario.cap_s:.0f} s of processing: {result.events:,} of {total:,} events"
                if any(code != 0 for code in codes):
                    result.error = f"worker exit statuses {codes} after SIGTERM"
            finally:
                stop_workers(workers)  # before the database is dropped under them
                await store.close()
    except ScenarioError as exc:
        result.error = str(exc)
    finally:
        result.seconds = time.monotonic() - started
    return result


def batch_stats(workers: list[WorkerProcess], event: str = "batch_committed") -> dict[str, Any]:
    """How many batches the workers committed, their mean size, and the version conflicts they met."""
    lines = [line for worker in workers for line in worker.log_lines(event)]
    processed = sum(line.get("processed", 0) for line in lines)
    conflicts = sum(line.get("conflicts", 0) for line in lines)
    return {
        "batches": len(lines),
        "mean_batch": processed / len(lines) if lines else None,
        "conflicts": conflicts,
        "conflicts_per_1k": conflicts * 1000 / processed if processed else None,
        "duplicates": sum(line.get("duplicates", 0) for line in lines),
    }


def cost(progress: Progress, workers: list[WorkerProcess]) -> dict[str, Any]:
    """CPU per event, and database round trips per unit of work committed, if the workers count them.

    A unit holds the batches of every partition its worker handed in together, so the
    committed batches (one log line each) are not the units: they overstate them and
    understate the round trips each unit costs.
    """
    trips, units = progress.round_trips, progress.units
    return {
        "cpu_us_per_event": progress.cpu_us_per_event(),
        "round_trips": trips,
        "units": units,
        "round_trips_per_unit": trips / units if trips is not None and units else None,
    }


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter or on PATH, if installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")
