"""Latency under a steady load: one worker, records produced at a fixed rate as it runs.

The worker starts first and joins its group on an empty topic; then records are produced at
the given rate (half the measured maximum), each with its send time as the record timestamp,
and every record's latency is its batch's commit time (the worker's batch_committed log
line) minus that timestamp: producer, broker, fetch, dispatch and commit, end to end.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from bench.dataset import Dataset, Layout, Record, Topic, new_topic, producer
from bench.report import Result, percentile
from bench.services import Services, open_store
from bench.workers import (
    ScenarioError,
    WorkerProcess,
    batch_stats,
    check_counts,
    fresh_database,
    latencies_ms,
    start_workers,
    stop_workers,
    wait_for_count,
    worker_env,
)

# Ticks per second of the producer's pacing.
_TICKS = 50


async def _wait_assigned(workers: list[WorkerProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.log_lines("partitions_assigned") for w in workers):
            return
        for worker in workers:
            if worker.process.poll() is not None:
                raise ScenarioError(f"the worker exited with status {worker.process.returncode} before joining: {worker.last_words()}")
        await asyncio.sleep(0.1)
    raise ScenarioError(f"the worker was not assigned partitions within {timeout_s:.0f} s")


async def _produce_at(topic: Topic, records: list[Record], rate: float) -> tuple[Layout, dict[tuple[int, int], int]]:
    """Send ``records`` at ``rate`` per second; returns where they went and (partition, offset) -> send time (ms)."""
    client = producer(topic.bootstrap, linger_ms=1, enable_idempotence=True)
    await client.start()
    sent: list[tuple[int, asyncio.Future[Any]]] = []
    try:
        started = time.monotonic()
        index = 0
        while index < len(records):
            due = min(len(records), int((time.monotonic() - started) * rate) + 1)
            while index < due:
                record = records[index]
                now_ms = int(time.time() * 1000)
                future = await client.send(topic.name, record.value, key=record.key, headers=list(record.headers), timestamp_ms=now_ms)
                sent.append((now_ms, future))
                index += 1
            await asyncio.sleep(1 / _TICKS)
        placed = await asyncio.gather(*(future for _, future in sent))
    finally:
        await client.stop()
    layout = Layout.of([(meta.partition, meta.offset, record.key) for meta, record in zip(placed, records, strict=True)])
    return layout, {(meta.partition, meta.offset): when for (when, _), meta in zip(sent, placed, strict=True)}


async def steady(services: Services, dataset: Dataset, rate: float, duration_s: float, workdir: Path, backend: str = "sqlite") -> Result:
    """One worker on a fresh topic, fed ``rate`` events/s for ``duration_s``; p50/p99 latency."""
    started = time.monotonic()
    count = max(1, min(len(dataset), int(rate * duration_s)))
    result = Result(f"steady {rate:,.0f}/s, {backend} x1", count)
    workers: list[WorkerProcess] = []
    try:
        topic = await new_topic(services, "steady")
        async with fresh_database(backend, services, workdir) as database:
            store = open_store(database.url)
            try:
                group = f"bench-{uuid.uuid4().hex[:8]}"
                workers = start_workers(1, worker_env(topic, group, database.url), workdir, "steady")
                await _wait_assigned(workers, timeout_s=60)
                produced_at = time.monotonic()
                layout, sent_ms = await _produce_at(topic, dataset.records[:count], rate)
                produce_s = time.monotonic() - produced_at
                progress = await wait_for_count(store, count, workers, cap_s=max(60.0, 3 * duration_s))
                if progress.capped:
                    raise ScenarioError(
                        f"the worker had not caught up {max(60.0, 3 * duration_s):.0f} s after it began: {progress.done_count} of {count}"
                    )
                result.rate = count / produce_s if produce_s > 0 else None
                result.peak_rss_mb = [m for m in (w.peak_rss_mb() for w in workers) if m is not None]
                codes = stop_workers(workers)
                result.exact, _ = await check_counts(store, layout, group, topic.name, complete=True)
                found = latencies_ms(workers, sent_ms)
                result.p50_ms, result.p99_ms = percentile(found, 0.50), percentile(found, 0.99)
                result.extra = {
                    "exit_codes": codes,
                    "offered": True,
                    "latency_samples": len(found),
                    "target_rate": rate,
                    **batch_stats(workers),
                }
                if any(code != 0 for code in codes):
                    result.error = f"worker exit status {codes} after SIGTERM"
                elif len(found) < count:
                    result.note = f"latency known for {len(found)} of {count} records (batch_committed lines without partition/offsets)"
            finally:
                stop_workers(workers)  # before the database is dropped under them
                await store.close()
    except ScenarioError as exc:
        result.error = str(exc)
    finally:
        result.seconds = time.monotonic() - started
    return result
