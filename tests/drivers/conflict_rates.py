"""Conflicts and retries per 1,000 events on one hot counter, at 1, 2 and 4 worker processes, per backend.

Run by hand (it asserts nothing; the multi-process tests check correctness):

    .venv/bin/python -m tests.drivers.conflict_rates [--events 1000] [--backends sqlite postgres]

Each row is a fresh database and ``--events`` PostMessageSent events of one room, split
evenly over the processes (tests/drivers/count_events.py: the real Dispatcher running the
built-in message-count app, one event per unit of work). ``conflicts`` counts commits refused
by a version check (each is followed by a retry of that event's unit of work);
``retried`` counts events that needed at least one retry. PostgreSQL is the one started by
docker/local/postgres.sh, or $RC_WORKER_TEST_POSTGRES_URL.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.drivers.count_events import ROOM, spawn
from tests.support import ROOT, counts, create_postgres_database, drop_postgres_database, store_for


def _postgres_admin_url() -> str:
    named = os.environ.get("RC_WORKER_TEST_POSTGRES_URL")
    if named:
        return named
    script = ROOT / "docker" / "local" / "postgres.sh"
    result = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=600, check=True)
    return result.stdout.strip().splitlines()[-1]


@asynccontextmanager
async def _database(backend: str) -> AsyncIterator[str]:
    """A fresh, migrated database of ``backend``; dropped afterwards."""
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as directory:
            url = f"sqlite+aiosqlite:///{Path(directory) / 'rates.db'}"
            async with store_for(url):
                pass
            yield url
        return
    admin = _postgres_admin_url()
    url = await create_postgres_database(admin)
    try:
        async with store_for(url):
            pass
        yield url
    finally:
        await drop_postgres_database(admin, url)


async def measure(backend: str, workers: int, events: int) -> dict[str, float]:
    """One row of the table."""
    async with _database(backend) as url:
        started = time.perf_counter()
        tallies = await spawn(url, events, workers, limit_s=900)
        wall = time.perf_counter() - started
        final = await counts(url)
    if final != {"misc:message-count": events, f"room:{ROOM}": events}:
        raise SystemExit(f"{backend} with {workers} workers counted {final}, not {events}")
    per_thousand = 1000 / events
    busiest = max(t["seconds"] for t in tallies)
    return {
        "conflicts": sum(t["conflicts"] for t in tallies) * per_thousand,
        "retried": sum(t["retried_events"] for t in tallies) * per_thousand,
        "events_per_s": events / busiest,
        "wall_s": wall,
    }


async def main(events: int, backends: list[str]) -> None:
    """Print the table."""
    print(f"{events} events on one counter; per 1,000 events:")
    print(f"{'backend':<10} {'workers':>7} {'conflicts':>10} {'retried':>8} {'events/s':>9}")
    for backend in backends:
        for workers in (1, 2, 4):
            row = await measure(backend, workers, events)
            print(f"{backend:<10} {workers:>7} {row['conflicts']:>10.0f} {row['retried']:>8.0f} {row['events_per_s']:>9.0f}", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgres"], choices=["sqlite", "postgres"])
    options = parser.parse_args()
    asyncio.run(main(options.events, options.backends))
