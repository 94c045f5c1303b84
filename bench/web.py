"""`python -m bench.web`: how fast the status pages answer with 100,000 records and 10,000 dead letters.

Fills a fresh PostgreSQL database with ``--records`` records of one app (every tenth shares
a room association, all share misc:all), and a fresh dead-letter topic with ``--dead-letters``
dead letters (as the worker writes them: rc-dlq-* headers), ``--ledger`` rows in the redrive
ledger (a tenth of the dead letters by default), and ``--outbox`` outbox rows already
published (the outbox keeps them) with a backlog of 25 not yet published. Then it samples
once (which reads the whole dead-letter topic into memory: its time is printed too) and
requests every page ``--repeat`` times in process (ASGI, the rendering included, no
socket), printing the median and the worst. Nothing is asserted:
timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime

import httpx
from pydantic import SecretStr
from sqlalchemy import insert, text

from bench.services import create_postgres_database, drop_postgres_database, find_services, migrate, open_store
from worker import constants
from worker.config import KafkaSettings, PersistenceSettings, Settings
from worker.kafka import Outgoing, Producer, create_topics
from worker.persistence.schema import dlq_redrives, outbox, record_associations, records
from worker.persistence.store import Store
from worker.web.app import create_app
from worker.web.live import Live

APP = "message-count"
PAGES = (
    "/",
    "/partitions",
    "/dead-letters",
    "/dead-letters?reason=handler&page=40",
    "/dead-letters?app=mentions",
    "/state",
    f"/state?app={APP}&association=room:r0007",
    f"/state?app={APP}&after=r0090000",
    "/explorer?partition=0",
    "/health",
)


async def fill_records(store: Store, count: int) -> None:
    batch = 5_000
    for start in range(0, count, batch):
        rows, links = [], []
        for n in range(start, min(count, start + batch)):
            record_id = f"r{n:07d}"
            associations = ["misc:all", f"room:r{n % 10:04d}"] if n % 10 == 7 else ["misc:all"]
            rows.append(
                {"app_id": APP, "id": record_id, "data": json.dumps({"count": n}), "version": 1, "associations": json.dumps(associations)}
            )
            links += [{"app_id": APP, "association": a, "record_id": record_id} for a in associations]
        async with store.engine.begin() as conn:
            await conn.execute(insert(records), rows)
            await conn.execute(insert(record_associations), links)


async def fill_dead_letters(kafka: KafkaSettings, store: Store, count: int, ledger_rows: int) -> None:
    letters = []
    for n in range(count):
        reason = "value is not JSON" if n % 3 else f"handler failed: RuntimeError: boom {n % 7}"
        headers = [
            ("content-type", b"application/cloudevents+json"),
            (constants.DLQ_REASON, reason.encode()),
            (constants.DLQ_STAGE, b"decode" if n % 3 else b"handler"),
            (constants.DLQ_TOPIC, kafka.topic.encode()),
            (constants.DLQ_PARTITION, str(n % 3).encode()),
            (constants.DLQ_OFFSET, str(n).encode()),
        ]
        if n % 3 == 0:
            headers.append((constants.DLQ_APP, b"mentions"))
        value = json.dumps({"specversion": "1.0", "id": f"evt-{n}", "data": {"text": "x" * 200}}).encode()
        letters.append(Outgoing(kafka.dead_letter_topic, f"room-{n % 50}".encode(), value, tuple(headers)))
    async with Producer(kafka) as producer:
        for start in range(0, count, 2_000):
            await producer.send_many(letters[start : start + 2_000])
    # Some already re-driven. The ledger only grows: rows past the first tenth stand for its
    # history, the letters the topic's retention dropped long ago. They lie past the topic's
    # letters here (the bench cannot age a topic); the pages leave them out either way.
    now = datetime.now(UTC)
    for start in range(0, ledger_rows, 5_000):
        ledger = [
            {
                "dlq_topic": kafka.dead_letter_topic,
                "dlq_partition": 0,
                "dlq_offset": n,
                "target": f"topic:{kafka.topic}",
                "redriven_at": now,
                "sent_at": now,
            }
            for n in range(start, min(ledger_rows, start + 5_000))
        ]
        async with store.engine.begin() as conn:
            await conn.execute(insert(dlq_redrives), ledger)


async def fill_outbox(kafka: KafkaSettings, store: Store, count: int) -> None:
    now = datetime.now(UTC)
    for start in range(0, count + 25, 5_000):
        rows = [
            {
                "app_id": APP,
                "source_topic": kafka.topic,
                "source_partition": n % 6,
                "topic": kafka.commands_topic,
                "key": b"room",
                "value": b'{"specversion": "1.0"}',
                "headers": "[]",
                "created_at": now,
                "published_at": now if n < count else None,
            }
            for n in range(start, min(count + 25, start + 5_000))
        ]
        async with store.engine.begin() as conn:
            await conn.execute(insert(outbox), rows)


async def measure(settings: Settings, store: Store, repeat: int) -> None:
    live = Live(settings, store)
    started = time.perf_counter()
    await live.refresh()
    print(f"first sample (reads all {len(live.dead_letters.newest_first)} dead letters): {(time.perf_counter() - started) * 1000:.0f} ms")
    started = time.perf_counter()
    await live.refresh()
    print(f"next sample (nothing new): {(time.perf_counter() - started) * 1000:.0f} ms")
    app = create_app(settings, store, live, run_live=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
        print(f"{'page':<48} {'median ms':>10} {'max ms':>8}")
        for path in PAGES:
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                response = await client.get(path)
                times.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise RuntimeError(f"{path} answered {response.status_code}: {response.text[:500]}")
            print(f"{path:<48} {statistics.median(times):>10.1f} {max(times):>8.1f}")


async def run(args: argparse.Namespace) -> None:
    services = find_services(postgres=True)
    assert services.postgres_admin is not None
    url = await create_postgres_database(services.postgres_admin)
    name = f"bench-web-{uuid.uuid4().hex[:8]}"
    kafka = KafkaSettings(
        bootstrap_servers=services.kafka, topic=name, dead_letter_topic=f"{name}.dlq", commands_topic=f"{name}.cmd", group_id=f"g-{name}"
    )
    settings = Settings(kafka=kafka, persistence=PersistenceSettings(url=SecretStr(url)))
    try:
        await migrate(url)
        await create_topics(kafka, partitions=6)
        store = open_store(url)
        try:
            started = time.perf_counter()
            await fill_records(store, args.records)
            await fill_dead_letters(kafka, store, args.dead_letters, args.dead_letters // 10 if args.ledger is None else args.ledger)
            await fill_outbox(kafka, store, args.outbox)
            async with store.engine.connect() as conn:  # statistics, as autovacuum would gather them on a live database
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text("ANALYZE"))
            print(
                f"filled {args.records} records, {args.dead_letters} dead letters and {args.outbox} published outbox rows "
                f"in {time.perf_counter() - started:.1f} s"
            )
            await measure(settings, store, args.repeat)
        finally:
            await store.close()
    finally:
        await drop_postgres_database(services.postgres_admin, url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--dead-letters", type=int, default=10_000)
    parser.add_argument("--outbox", type=int, default=100_000)
    parser.add_argument("--ledger", type=int, default=None, help="redrive ledger rows (default: a tenth of --dead-letters)")
    parser.add_argument("--repeat", type=int, default=10)
    asyncio.run(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
