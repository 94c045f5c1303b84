"""``rc-worker replay``: run a range of a topic through chosen apps into a database, then stop.

The live worker's Dispatcher turns each partition's batch into one unit of work with the
same processed markers, so a replay of a whole topic into a fresh database ends with the
records live processing made, and events the database already has count as duplicates.
Partitions are assigned, not subscribed, so the live group's offsets never move. With
``--group NAME`` several processes share one replay as a consumer group of their own: the
first to take a partition pins its range in the group's committed offset, so each process
stops where the range ended when the replay began, and a rerun resumes. A replay sends
nothing to Kafka: the dead letters and commands it stages stay unpublished in its outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from structlog.contextvars import bound_contextvars

from worker.apps.contract import App
from worker.apps.http import Http
from worker.config import KafkaSettings, Settings
from worker.errors import BrokerError, ConfigError, PersistenceError, WorkerError
from worker.events import RawRecord
from worker.kafka import Consumer, PartitionReader, group_offsets
from worker.persistence.admin import prepare
from worker.persistence.store import Store
from worker.persistence.unit import Snapshot
from worker.pipeline.combine import Combiner
from worker.pipeline.dispatch import ConflictsExhausted, Dispatcher, Topics
from worker.pipeline.retry import until_committed
from worker.pipeline.tally import BatchResult
from worker.tools.common import CONNECT_TIMEOUT_S, Span, Start, parse_names, parse_time, plan, require_records, start_from_args, state_store

log = structlog.get_logger("worker.replay")

# Tries of one batch when the database fails or its conflicts never end, before the replay gives up.
BATCH_MAX_ATTEMPTS = 10
# A replay whose partitions stop advancing this long has lost its broker: fail, do not hang.
STALL_TIMEOUT_S = 60.0
# Commit metadata pinning a replay group's end offset of a partition ("rc-replay end=1234").
END_MARK = "rc-replay end="


@dataclass
class ReplaySummary:
    """What one replay process did; ``render`` is what the command prints."""

    topic: str
    partitions: int = 0
    records: int = 0
    duration_s: float = 0.0
    total: BatchResult = field(default_factory=lambda: BatchResult(next_offset=0))

    def add(self, result: BatchResult, records: int) -> None:
        """Count one committed batch of ``records`` records."""
        self.records += records
        self.total.add(result)

    @property
    def events(self) -> int:
        """Events an app ran on, committed."""
        return self.total.processed

    @property
    def duplicates(self) -> int:
        """Events an app had already processed."""
        return self.total.duplicates

    @property
    def skipped(self) -> int:
        """Events of a type the apps do not handle."""
        return self.total.skipped

    @property
    def dead_letters(self) -> int:
        """Undecodable records, and events an app failed for good (counted per app)."""
        return self.total.dead_lettered + self.total.outcomes_of("dead_lettered")

    @property
    def conflicts(self) -> int:
        """Version conflicts retried."""
        return self.total.conflicts

    @property
    def per_app(self) -> dict[str, int]:
        """Events processed, by app."""
        return self.total.per_app

    @property
    def rate(self) -> float:
        """Records per second."""
        return self.records / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The summary as JSON-ready values."""
        counts = {name: getattr(self, name) for name in ("events", "duplicates", "skipped", "dead_letters", "conflicts")}
        return {
            "topic": self.topic,
            "partitions": self.partitions,
            "records": self.records,
            **counts,
            "per_app": dict(self.per_app),
            "duration_s": round(self.duration_s, 3),
            "records_per_s": round(self.rate, 1),
        }

    def render(self) -> str:
        """A few lines for a terminal."""
        head = f"replayed {self.records} records of {self.topic} ({self.partitions} partitions) in {self.duration_s:.1f}s"
        tail = f"duplicates: {self.duplicates}  skipped: {self.skipped}  dead letters: {self.dead_letters}  conflicts retried: {self.conflicts}"
        lines = [
            f"{head}: {self.rate:.0f} events/s",
            *(f"  {app_id}: {count} events" for app_id, count in sorted(self.per_app.items())),
            f"  {tail}",
        ]
        return "\n".join(lines)


class Replay:
    """One replay process: a range of a topic through chosen apps into one database."""

    def __init__(
        self,
        settings: Settings,
        apps: Sequence[App],
        store: Store,
        *,
        topic: str | None = None,
        start: Start | None = None,
        to_time_ms: int | None = None,
        group: str | None = None,
    ) -> None:
        self.settings = settings
        self.kafka: KafkaSettings = settings.kafka.model_copy(update={"topic": topic or settings.kafka.topic})
        self.store = store
        self.start = start or Start()
        self.to_time_ms = to_time_ms
        self.group = group
        self.http = Http(settings.http)
        self.dispatcher = Dispatcher(
            apps,
            store,
            self.http,
            Topics(self.kafka.dead_letter_topic, self.kafka.commands_topic),
            settings.processing,
            own_user_id=settings.rocketchat.app_user_id,
        )
        # The partitions' batches of one fetch run as one unit, on one snapshot kept from batch
        # to batch: no conflicts among them, and no re-reading what the last batch wrote.
        self.combiner = Combiner(self.dispatcher)
        self.summary = ReplaySummary(self.kafka.topic)

    async def run(self) -> ReplaySummary:
        """Replay the range and return what was done.

        Raises:
            ConfigError: the range is empty or names what the topic lacks; nothing was written.
            BrokerError: Kafka cannot be reached or stopped serving the range.
            PersistenceError: the database failed for good.

        """
        started = time.monotonic()
        try:
            async with PartitionReader(self.kafka, self.kafka.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
                spans = await plan(self.kafka, reader, self.start, self.to_time_ms)
                require_records(spans, self.kafka.topic, self.start, self.to_time_ms)
                await prepare(self.store)
                log.info("replay_started", topic=self.kafka.topic, group=self.group, spans={p: (s.start, s.end) for p, s in spans.items()})
                if self.group is None:
                    await self._run_assigned(reader, spans)
            if self.group is not None:
                await self._run_group(self.group, spans)
        finally:
            await self.http.aclose()
        self.summary.duration_s = time.monotonic() - started
        log.info("replay_finished", **self.summary.as_dict())
        return self.summary

    async def _run_assigned(self, reader: PartitionReader, spans: dict[int, Span]) -> None:
        """Alone: every partition of the range, assigned to this process."""
        remaining = {p: span.end for p, span in spans.items() if span.size}
        self.summary.partitions = len(remaining)
        reader.assign({p: spans[p].start for p in remaining})
        stall = _Stall(self.kafka.topic)
        while remaining:
            fetched = await reader.fetch(remaining, self.kafka.fetch_timeout_ms, self.kafka.max_batch_records)
            batches = _within(fetched, remaining)
            await self._dispatch_all(batches)
            for partition in list(remaining):
                if await reader.position(partition) >= remaining[partition]:
                    del remaining[partition]
            stall.check(bool(batches), remaining)

    async def _run_group(self, group: str, spans: dict[int, Span]) -> None:
        """One member of a replay group: the partitions Kafka assigns, each to its pinned end."""
        consumer = Consumer(self.kafka, group_id=group)
        ends: dict[int, int] = {}
        positions: dict[int, int] = {}
        assigned = asyncio.Event()
        lock = asyncio.Lock()  # a rebalance waits for the batch in flight

        async def commit(partitions: Sequence[int]) -> None:
            await consumer.commit({p: positions[p] for p in partitions}, {p: f"{END_MARK}{ends[p]}" for p in partitions})

        async def on_assigned(partitions: set[int]) -> None:
            committed = await group_offsets(self.kafka, group, self.kafka.topic, CONNECT_TIMEOUT_S)
            fresh = []
            for partition in sorted(partitions):
                pinned = _pinned(committed.get(partition))
                if pinned is None:
                    span = spans.get(partition, Span(0, 0))
                    pinned = (span.start, span.end)
                    fresh.append(partition)
                positions[partition], ends[partition] = pinned
                consumer.seek(partition, positions[partition])
                if positions[partition] >= ends[partition]:
                    consumer.pause(partition)
            await commit(fresh)
            log.info("replay_partitions_assigned", partitions=sorted(partitions), ranges={p: (positions[p], ends[p]) for p in partitions})
            assigned.set()

        async def on_revoked(partitions: set[int]) -> None:
            async with lock:
                for partition in partitions:
                    ends.pop(partition, None)
                    positions.pop(partition, None)

        await consumer.start(on_revoked, on_assigned)
        try:
            try:
                async with asyncio.timeout(max(30.0, 3 * self.kafka.session_timeout_ms / 1000)):
                    await assigned.wait()
            except TimeoutError:
                raise BrokerError(f"replay group {group} got no partitions of {self.kafka.topic} in time; is the broker healthy?") from None
            await self._consume_group(consumer, ends, positions, lock, commit)
        finally:
            await consumer.stop()

    async def _consume_group(
        self,
        consumer: Consumer,
        ends: dict[int, int],
        positions: dict[int, int],
        lock: asyncio.Lock,
        commit: Callable[[Sequence[int]], Awaitable[None]],
    ) -> None:
        worked: set[int] = set()
        stall = _Stall(self.kafka.topic)
        while any(positions[p] < ends[p] for p in ends):
            fetched = await consumer.fetch(self.kafka.fetch_timeout_ms, self.kafka.max_batch_records)
            async with lock:
                owned = {p: ends[p] for p in fetched if p in ends}
                batches = _within(fetched, owned)
                await self._dispatch_all(batches)
                for partition in owned:
                    positions[partition] = min(fetched[partition][-1].offset + 1, ends[partition])
                    if positions[partition] >= ends[partition]:
                        consumer.pause(partition)
                await commit(sorted(owned))
                worked.update(batches)
                self.summary.partitions = len(worked)
                stall.check(bool(batches), {p: ends[p] for p in ends if positions[p] < ends[p]})

    async def _dispatch_all(self, batches: dict[int, list[RawRecord]]) -> None:
        """Dispatch each partition's batch, partitions concurrently as the live worker does."""
        try:
            async with asyncio.TaskGroup() as group:
                for partition, records in batches.items():
                    group.create_task(self._dispatch(partition, records))
        except ExceptionGroup as failed:
            first = failed.exceptions[0]
            raise first if isinstance(first, WorkerError) else failed from None

    async def _dispatch(self, partition: int, records: list[RawRecord]) -> None:
        with bound_contextvars(topic=self.kafka.topic, partition=partition):
            # No fence: a replay owns no partition of the live group, and its processed
            # markers already keep two replay processes from applying an event twice.
            result = await until_committed(
                lambda: self.combiner.dispatch(records, None, snapshot=Snapshot()),
                self.settings.processing,
                retry_on=(PersistenceError, ConflictsExhausted),
                on_retry=lambda exc, attempt: log.warning(
                    "replay_batch_retry", reason=str(exc), attempt=attempt, first_offset=records[0].offset
                ),
                max_attempts=BATCH_MAX_ATTEMPTS,
            )
            if result is None:  # pragma: no cover - a bounded loop returns or raises
                return
            self.summary.add(result, len(records))
            log.info("replay_batch_committed", first_offset=records[0].offset, **result.log_fields())


class _Stall:
    """Fails a replay whose partitions have not advanced for STALL_TIMEOUT_S."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.since = time.monotonic()

    def check(self, progressed: bool, remaining: dict[int, int]) -> None:
        now = time.monotonic()
        if progressed or not remaining:
            self.since = now
        elif now - self.since > STALL_TIMEOUT_S:
            raise BrokerError(
                f"no records of {self.topic} arrived for {STALL_TIMEOUT_S:g}s though partitions {sorted(remaining)} "
                "have not reached their end; is the broker healthy, or were records deleted meanwhile?"
            )


def _within(fetched: dict[int, list[RawRecord]], ends: dict[int, int]) -> dict[int, list[RawRecord]]:
    """The fetched records of the partitions in ``ends``, each cut at its end offset."""
    batches = {p: [r for r in records if r.offset < ends[p]] for p, records in fetched.items() if p in ends}
    return {p: records for p, records in batches.items() if records}


def _pinned(committed: tuple[int, str] | None) -> tuple[int, int] | None:
    """(position, end) of a partition this replay group already started, from its commit."""
    if committed is None or not committed[1].startswith(END_MARK):
        return None
    try:
        return committed[0], int(committed[1].removeprefix(END_MARK))
    except ValueError:
        return None


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker replay``: parse, replay, print the summary."""
    from worker.plugins import load_apps

    start = start_from_args(args)
    to_time_ms = parse_time(args.to_time, "--to-time") if args.to_time else None
    handlers = parse_names(args.handlers, "--handlers") if args.handlers else list(settings.handlers.enabled)
    if args.group is not None and args.group == settings.kafka.group_id:
        raise ConfigError(f"--group {args.group} is the live consumer group (kafka.group_id); name the replay group differently")
    apps = load_apps(handlers, settings.handlers.settings)
    store = state_store(args.state)
    try:
        summary = await Replay(settings, apps, store, topic=args.topic, start=start, to_time_ms=to_time_ms, group=args.group).run()
    finally:
        await store.close()
    print(orjson.dumps(summary.as_dict()).decode() if args.json else summary.render())
    return 0
