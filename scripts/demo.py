"""`make demo`: the whole service on one machine, checked against the generator's totals.

Starts the local Kafka (unless KAFKA_BOOTSTRAP_SERVERS names a broker, or one is already
running), creates a fresh 6-partition topic, loads 10,000 generated events with duplicates
and invalid records mixed in, runs two `rc-worker run` processes of one group on the default
SQLite file until they have caught up, prints the counts beside the expected ones and the
rate achieved, then stops the workers (and the broker, if this script started it).
Exit status 0 only if every count matches and both workers stopped cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from worker.config import KafkaSettings, PersistenceSettings, Settings
from worker.kafka import read_topic
from worker.persistence.store import Store

ROOT = Path(__file__).resolve().parent.parent

RC_WORKER = [sys.executable, "-m", "worker"]
KAFKA_SH = ["bash", str(ROOT / "docker" / "local" / "kafka.sh")]
GENERATOR = ROOT / "tests" / "fixtures" / "make_events.py"
DATABASE = ROOT / "rc-worker.db"  # the default persistence.url, relative to the checkout
APP = "message-count"
WORKERS = 2
PARTITIONS = 6
PROGRESS_EVERY_S = 3.0


class DemoError(Exception):
    """Raised when a step fails; the message says which and what to look at."""


def step(text: str) -> None:
    """Announce a step."""
    print(f"==> {text}", flush=True)


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command to completion; its stdout, or DemoError with its stderr."""
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)  # noqa: S603
    if result.returncode != 0:
        raise DemoError(f"`{' '.join(args)}` exited {result.returncode}:\n{result.stderr.strip()[-2000:]}")
    return result.stdout


# -- the broker ------------------------------------------------------------------------------


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """The bootstrap address of a broker; stops it afterwards only if it was started here."""
    named = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if named:
        step(f"using the broker at {named} (KAFKA_BOOTSTRAP_SERVERS)")
        yield named
        return
    status = subprocess.run([*KAFKA_SH, "status"], capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    if status.returncode == 0:
        address = status.stdout.split()[1]
        step(f"using the local broker already running at {address}")
        yield address
        return
    step("starting the local Kafka broker (docker/local/kafka.sh; the first run downloads it)")
    address = run(*KAFKA_SH, "start").strip().splitlines()[-1]
    try:
        yield address
    finally:
        step("stopping the broker this demo started")
        subprocess.run([*KAFKA_SH, "stop"], capture_output=True, timeout=120, check=False)  # noqa: S603


# -- the workers -----------------------------------------------------------------------------


@dataclass
class Workers:
    """The `rc-worker run` processes, each logging JSON lines to its own file."""

    env: dict[str, str]
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, count: int) -> None:
        """Start ``count`` workers of the group."""
        for number in range(count):
            with (self.log_dir / f"worker-{number}.log").open("wb") as log:
                self.processes.append(subprocess.Popen([*RC_WORKER, "run"], cwd=ROOT, env=self.env, stdout=log, stderr=log))  # noqa: S603

    def check_alive(self) -> None:
        """DemoError with the log's end if a worker has exited."""
        for number, process in enumerate(self.processes):
            if process.poll() is not None:
                raise DemoError(f"worker {number} exited with status {process.returncode}:\n{self.log_tail(number)}")

    def stop(self, timeout: float = 60) -> list[int | None]:
        """SIGTERM all at once, then wait for each; None for one that had to be killed."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        statuses: list[int | None] = []
        for process in self.processes:
            try:
                statuses.append(process.wait(timeout=timeout))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
                statuses.append(None)
        return statuses

    def log_tail(self, number: int, lines: int = 20) -> str:
        """The last lines of a worker's log."""
        text = (self.log_dir / f"worker-{number}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def log_events(self, number: int, name: str) -> list[dict[str, Any]]:
        """The JSON log lines of worker ``number`` named ``name``."""
        found = []
        for line in (self.log_dir / f"worker-{number}.log").read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and item.get("event") == name:
                    found.append(item)
        return found


def seconds_between(first: dict[str, Any], last: dict[str, Any]) -> float:
    """Seconds from one log line's timestamp to another's."""
    return (datetime.fromisoformat(last["timestamp"]) - datetime.fromisoformat(first["timestamp"])).total_seconds()


# -- state -----------------------------------------------------------------------------------


async def read_counts(url: str) -> dict[str, int]:
    """Every counter of the message-count app: {"misc:message-count": N, "room:r0001": n, ...}."""
    store = Store.from_settings(PersistenceSettings(url=SecretStr(url)))
    try:
        found: dict[str, int] = {}
        for record in await store.app_records(APP):
            for association in record.associations:
                found[association] = found.get(association, 0) + json.loads(record.data)["count"]
        return found
    finally:
        await store.close()


def wait_for_counts(url: str, expected: dict[str, int], workers: Workers, within: float) -> dict[str, int]:
    """Poll the counters until they equal ``expected``; DemoError after ``within`` seconds."""
    deadline = time.monotonic() + within
    shown_at = time.monotonic()
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        workers.check_alive()
        counts = asyncio.run(read_counts(url))
        if counts == expected:
            return counts
        if time.monotonic() - shown_at >= PROGRESS_EVERY_S:
            print(f"    counted {counts.get('misc:message-count', 0):>6,} of {expected['misc:message-count']:,}", flush=True)
            shown_at = time.monotonic()
        time.sleep(0.5)
    raise DemoError(
        f"the workers did not catch up within {within:.0f}s: counted {counts.get('misc:message-count', 0):,} "
        f"of {expected['misc:message-count']:,} (the workers' last log lines are above); raise --timeout on a slow machine"
    )


def dead_letters(kafka: KafkaSettings, expected: int, within: float) -> int:
    """How many records reached the dead-letter topic, waiting up to ``within`` seconds for ``expected``."""

    async def read() -> int:
        return len([r async for r in read_topic(kafka, kafka.dead_letter_topic, idle_timeout_ms=500)])

    deadline = time.monotonic() + within
    found = asyncio.run(read())
    while found < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        found = asyncio.run(read())
    return found


# -- report ----------------------------------------------------------------------------------


def report(expected: dict[str, int], counted: dict[str, int]) -> bool:
    """Print the counters beside the expected values; True if all match."""
    rows = [("all messages", "misc:message-count")]
    rows += [(key.removeprefix("room:"), key) for key in sorted(k for k in expected if k.startswith("room:"))]
    rows += [(f"{key} (unexpected)", key) for key in sorted(set(counted) - set(expected))]
    width = max(len(label) for label, _ in rows)
    print(f"    {'counter':<{width}}  {'expected':>8}  {'counted':>8}  ok")
    print(f"    {'-' * width}  {'-' * 8}  {'-' * 8}  --")
    matched = True
    for label, key in rows:
        want, got = expected.get(key, 0), counted.get(key, 0)
        matched &= want == got
        print(f"    {label:<{width}}  {want:>8,}  {got:>8,}  {'yes' if want == got else 'NO'}")
    return matched


# -- main ------------------------------------------------------------------------------------


def demo(args: argparse.Namespace, bootstrap: str, work: Path) -> bool:
    """Every step after the broker is up; True if all checks pass."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    topic = f"demo-{stamp}"
    url = f"sqlite+aiosqlite:///{DATABASE}"
    env = {
        **os.environ,
        "RC_WORKER_CONFIG": str(ROOT / "config.yaml"),
        "RC_WORKER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "RC_WORKER_KAFKA__TOPIC": topic,
        "RC_WORKER_KAFKA__DEAD_LETTER_TOPIC": f"{topic}.dlq",
        "RC_WORKER_KAFKA__COMMANDS_TOPIC": f"{topic}.cmd",
        "RC_WORKER_KAFKA__GROUP_ID": f"demo-{stamp}",
        "RC_WORKER_PERSISTENCE__URL": url,
        "RC_WORKER_LOGGING__FORMAT": "json",
        "RC_WORKER_LOGGING__LEVEL": "debug",  # the per-batch batch_committed lines, read for the shares below
    }
    if "observability" in Settings.model_fields:
        env["RC_WORKER_OBSERVABILITY__PORT"] = "0"  # two workers on one host: each its own free port

    step(f"creating topic {topic} with {PARTITIONS} partitions (and {topic}.dlq, {topic}.cmd)")
    run(*RC_WORKER, "topics", "create", "--partitions", str(PARTITIONS), env=env)

    events = work / "events.jsonl"
    step(f"generating {args.events:,} events over {args.rooms} rooms, with duplicates and invalid records mixed in")
    with events.open("w") as out:
        generate = [sys.executable, str(GENERATOR), "--count", str(args.events), "--rooms", str(args.rooms), "--seed", "7"]
        mix = ["--duplicate-every", "97", "--invalid-every", "1000", "--expect", str(work / "expect.json")]
        subprocess.run([*generate, *mix], stdout=out, check=True, timeout=300)  # noqa: S603
    totals = json.loads((work / "expect.json").read_text())
    records = totals["events"] + totals["duplicates"] + totals["invalid"]
    print(f"    {records:,} records: {totals['events']:,} events, {totals['duplicates']:,} duplicates, {totals['invalid']:,} invalid")

    step("loading them with `rc-worker load`")
    print("    " + run(*RC_WORKER, "load", str(events), env=env).strip())

    step(f"creating a fresh database {DATABASE.name} with `rc-worker db upgrade`")
    for suffix in ("", "-wal", "-shm"):
        DATABASE.with_name(DATABASE.name + suffix).unlink(missing_ok=True)
    print("    " + run(*RC_WORKER, "db", "upgrade", env=env).strip())

    expected = {"misc:message-count": totals["events"], **{f"room:{room}": n for room, n in totals["rooms"].items()}}
    workers = Workers(env, work)
    step(f"running {WORKERS} workers of group demo-{stamp} until the counts are complete")
    started = time.monotonic()
    workers.start(WORKERS)
    try:
        counted = wait_for_counts(url, expected, workers, args.timeout)
        elapsed = time.monotonic() - started
        kafka = KafkaSettings(bootstrap_servers=bootstrap, topic=topic, dead_letter_topic=f"{topic}.dlq", commands_topic=f"{topic}.cmd")
        dead = dead_letters(kafka, totals["invalid"], within=30)
    except BaseException:
        statuses = workers.stop(timeout=30)
        for number in range(WORKERS):
            print(f"--- worker {number} (exit {statuses[number]}), last lines of its log:\n{workers.log_tail(number)}", file=sys.stderr)
        raise

    step("stopping the workers with SIGTERM")
    statuses = workers.stop()
    print(f"    exit statuses: {statuses}")

    step("results")
    problems = [] if report(expected, counted) else ["the counts do not match"]
    print(f"    dead-lettered: {dead} of {totals['invalid']} invalid records")
    if dead != totals["invalid"]:
        problems.append(f"{dead} of {totals['invalid']} invalid records reached the dead-letter topic")
    if statuses != [0] * WORKERS:
        problems.append(f"the workers exited with {statuses}, not 0")
    print_rates(workers, totals["events"], records, elapsed)
    print("\n" + ("FAIL: " + "; ".join(problems) if problems else "PASS: every count matches and both workers stopped cleanly"))
    print(f"    see the state with: .venv/bin/rc-worker state dump --app {APP}")
    return not problems


def print_rates(workers: Workers, events: int, records: int, elapsed: float) -> None:
    """Events per second, from the workers' start and from their first partition assignment."""
    print(f"    rate: {events / elapsed:,.0f} events/s ({events:,} events, {records:,} records, in {elapsed:.1f}s from the workers' start)")
    assigned = [e for n in range(WORKERS) for e in workers.log_events(n, "partitions_assigned")]
    committed = [e for n in range(WORKERS) for e in workers.log_events(n, "batch_committed")]
    if assigned and committed:
        busy = seconds_between(min(assigned, key=lambda e: e["timestamp"]), max(committed, key=lambda e: e["timestamp"]))
        if busy > 0:
            print(f"    rate from the first partition assignment to the last commit: {events / busy:,.0f} events/s ({busy:.1f}s)")
    shares = [sum(e.get("processed", 0) for e in workers.log_events(n, "batch_committed")) for n in range(WORKERS)]
    print("    events processed per worker: " + ", ".join(f"worker {n}: {share:,}" for n, share in enumerate(shares)))


def main() -> int:
    """Run the demo; the exit status says whether every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000, help="unique events to generate (default 10,000)")
    parser.add_argument("--rooms", type=int, default=20, help="rooms they are spread over (default 20)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds the workers get to catch up (default 180)")
    args = parser.parse_args()
    try:
        with broker() as bootstrap, tempfile.TemporaryDirectory(prefix="rc-demo-") as work:
            return 0 if demo(args, bootstrap, Path(work)) else 1
    except DemoError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
