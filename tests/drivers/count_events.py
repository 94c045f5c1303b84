"""One OS process of the multi-process counting tests: the naive counter through the real dispatcher.

Run as ``python -m tests.drivers.count_events --url URL --events N --worker I --workers P``.
It builds PostMessageSent records (CloudEvents structured mode, one room, so every event
increments the same two counters), takes every P-th of them starting at I (or all of them
with ``--duplicates``, as a publisher retrying to several partitions would), and dispatches
each alone through ``worker.dispatch.Dispatcher`` running the built-in ``message-count`` app:
one unit of work per event, retried on conflict exactly as the worker does. It prints
``ready`` and waits for a line on stdin before starting, so that all processes start together,
then prints one JSON line of what it saw: events dispatched, processed, duplicates,
conflicts (commits refused by a version check) and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from worker import logs
from worker.apps.http import Http
from worker.config import LoggingSettings, PersistenceSettings, ProcessingSettings
from worker.events import RawRecord
from worker.persistence.store import Store
from worker.pipeline.dispatch import ConflictsExhausted, Dispatcher, Topics
from worker.plugins import load_apps

ROOT = Path(__file__).resolve().parents[2]
SOURCE = "//drivers.example.com"
ROOM = "r-hot"
APP = "message-count"
# A batch that exhausts its conflict attempts is dispatched again, as the runner does; this
# bounds how often, so a broken version check fails the run instead of spinning forever.
MAX_DISPATCHES = 50


def event_record(n: int, worker: int) -> RawRecord:
    """The n-th event, as a Kafka record fetched from partition ``worker`` at offset n."""
    value = {
        "specversion": "1.0",
        "type": "chat.rocket.message.sent",
        "source": SOURCE,
        "id": f"evt-{n:07d}",
        "time": "2026-11-29T10:00:00.000Z",
        "datacontenttype": "application/json",
        "data": {
            "id": f"msg-{n:07d}",
            "room": {"id": ROOM, "type": "c"},
            "sender": {"id": "u1", "username": "u1"},
            "text": "hello",
            "createdAt": "2026-11-29T09:00:00.000Z",
        },
    }
    headers = (("content-type", b"application/cloudevents+json"),)
    return RawRecord("drivers", worker, n, 0, ROOM.encode(), json.dumps(value).encode(), headers)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    """Dispatch this process's events one by one; returns the tally."""
    store = Store.from_settings(PersistenceSettings(url=args.url, pool_size=2))  # type: ignore[arg-type]
    http = Http()
    settings = ProcessingSettings(conflict_max_attempts=args.max_attempts)
    dispatcher = Dispatcher(load_apps([APP], {}), store, http, Topics("drivers.dlq", "drivers.cmd"), settings)
    mine = [n for n in range(args.events) if args.duplicates or n % args.workers == args.worker]
    records = [event_record(n, args.worker) for n in mine]
    tally = {
        "worker": args.worker,
        "events": len(records),
        "processed": 0,
        "duplicates": 0,
        "conflicts": 0,
        "retried_events": 0,
        "dead_lettered": 0,
    }
    try:
        await store.check_schema()
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the go signal: every process starts together
        started = time.perf_counter()
        for record in records:
            for _ in range(MAX_DISPATCHES):
                try:
                    result = await dispatcher.dispatch([record], None)
                except ConflictsExhausted:
                    tally["conflicts"] += args.max_attempts
                    continue
                tally["conflicts"] += result.conflicts
                tally["retried_events"] += result.conflicts > 0
                break
            else:
                raise RuntimeError(f"event at offset {record.offset} was not committed after {MAX_DISPATCHES} dispatches")
            tally["processed"] += result.per_app.get(APP, 0)
            tally["duplicates"] += result.duplicates
            tally["dead_lettered"] += result.dead_lettered
        tally["seconds"] = round(time.perf_counter() - started, 3)
    finally:
        await http.aclose()
        await store.close()
    return tally


async def spawn(url: str, events: int, workers: int, *, duplicates: bool = False, limit_s: float = 180) -> list[dict[str, Any]]:
    """Run ``workers`` processes of this driver on ``url`` together; returns their tallies.

    Every process is started, waited for until it is ready (imports and connections done),
    then all are told to go at once, so they really contend for the counter.
    """
    extra = ["--duplicates"] if duplicates else []
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.drivers.count_events",
            *("--url", url, "--events", str(events), "--worker", str(i), "--workers", str(workers), *extra),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for i in range(workers)
    ]
    try:
        async with asyncio.timeout(limit_s):
            for process in processes:
                assert process.stdout is not None
                ready = await process.stdout.readline()
                if ready.strip() != b"ready":
                    _, stderr = await process.communicate()
                    raise RuntimeError(f"driver did not start: {ready!r}\n{stderr.decode(errors='replace')[-3000:]}")
            outputs = await asyncio.gather(*(process.communicate(b"go\n") for process in processes))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    tallies = []
    for process, (stdout, stderr) in zip(processes, outputs, strict=True):
        if process.returncode != 0:
            raise RuntimeError(f"driver exited {process.returncode}:\n{stderr.decode(errors='replace')[-3000:]}")
        tallies.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return tallies


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="database URL (already migrated)")
    parser.add_argument("--events", type=int, required=True, help="events in the whole run")
    parser.add_argument("--worker", type=int, default=0, help="this process's index")
    parser.add_argument("--workers", type=int, default=1, help="processes in the run")
    parser.add_argument("--duplicates", action="store_true", help="dispatch every event, not only this process's share")
    parser.add_argument("--max-attempts", type=int, default=100, help="processing.conflict_max_attempts")
    return parser.parse_args(argv)


if __name__ == "__main__":
    # Warnings and errors only, to stderr: stdout carries the ready line and the tally.
    logs.configure(LoggingSettings(level="warning", format="json"))
    print(json.dumps(asyncio.run(main(parse_args()))), flush=True)
