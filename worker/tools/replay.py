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
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from typing import Protocol

import orjson
import structlog
from structlog.contextvars import bound_contextvars

from worker.apps.contract import App
from worker.apps.http import Http
from worker.apps.readers import Directory
from worker.config import KafkaSettings, Settings
from worker.errors import BrokerError, ConfigError, PersistenceError, WorkerError
from worker.events import RawRecord
from worker.kafka import Consumer, PartitionReader, group_offsets
from worker.persistence.admin import prepare
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Store
from worker.pipeline.combine import Combiner
from worker.pipeline.dispatch import ConflictsExhausted, Dispatcher, Topics
from worker.pipeline.retry import until_committed
from worker.pipeline.stall import Stall
from worker.pipeline.tally import BatchResult
from worker.tools.common import CONNECT_TIMEOUT_S, Span, Start, parse_names, parse_time, plan, require_records, start_from_args, state_store
from worker.tools.progress import Progress
from worker.tools.replay_summary import ReplaySummary

log = structlog.get_logger("worker.replay")

# Tries of one batch when the database fails or its conflicts never end, before the replay gives up.
BATCH_MAX_ATTEMPTS = 10
# A replay whose partitions stop advancing this long has lost its broker: fail, do not hang.
STALL_TIMEOUT_S = 60.0
# How often `replay --workers N` reads its group's committed offsets for the progress display.
WORKERS_POLL_S = 1.0
# Commit metadata pinning a replay group's end offset of a partition ("rc-replay end=1234").
END_MARK = "rc-replay end="


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
        self.directory = Directory.from_settings(settings.rocketchat)
        self.dispatcher = Dispatcher(
            apps,
            store,
            self.http,
            Topics(self.kafka.dead_letter_topic, self.kafka.commands_topic),
            settings.processing,
            own_user_id=settings.rocketchat.app_user_id,
            directory=self.directory,
        )
        # The partitions' batches of one fetch run as one unit, on one snapshot kept from batch
        # to batch: no conflicts among them, and no re-reading what the last batch wrote.
        self.combiner = Combiner(self.dispatcher)
        self.summary = ReplaySummary(self.kafka.topic)
        self.progress: Progress | None = None

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
                    with self._progress({p: s.size for p, s in spans.items() if s.size}):
                        await self._run_assigned(reader, spans)
            if self.group is not None:
                with self._progress({}):  # sized as Kafka assigns partitions
                    await self._run_group(self.group, spans)
        finally:
            self.progress = None
            await self.http.aclose()
            await self.directory.aclose()
        self.summary.duration_s = time.monotonic() - started
        log.info("replay_finished", **self.summary.as_dict())
        return self.summary

    def _progress(self, sizes: dict[int, int]) -> Progress:
        self.progress = Progress("replay", sum(sizes.values()), unit="events", partitions=sizes)
        return self.progress

    async def _run_assigned(self, reader: PartitionReader, spans: dict[int, Span]) -> None:
        """Alone: every partition of the range, assigned to this process."""
        remaining = {p: span.end for p, span in spans.items() if span.size}
        self.summary.partitions = len(remaining)
        reader.assign({p: spans[p].start for p in remaining})
        stall = _Stall(self.kafka.topic)
        while remaining:
            fetched = await gather(reader, remaining, self.kafka.fetch_timeout_ms, self.kafka.max_batch_records)
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
            if self.progress is not None:
                self.progress.resize({p: ends[p] - positions[p] for p in partitions})
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
            remaining = [p for p in ends if positions[p] < ends[p]]
            fetched = await gather(consumer, remaining, self.kafka.fetch_timeout_ms, self.kafka.max_batch_records)
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
            if self.progress is not None:
                self.progress.advance(
                    result.next_offset - records[0].offset,
                    partition=partition,
                    dead_letters=result.dead_letters,
                    duplicates=result.duplicates,
                )
            # Per batch, so at debug (--verbose): the progress display says how far the replay is.
            log.debug("replay_batch_committed", first_offset=records[0].offset, **result.log_fields())


class _Stall:
    """Fails a replay whose partitions have not advanced for STALL_TIMEOUT_S."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.stall = Stall(STALL_TIMEOUT_S)

    def check(self, progressed: bool, remaining: dict[int, int]) -> None:
        if progressed or not remaining:
            self.stall.moved()
        elif self.stall.stalled():
            raise BrokerError(
                f"no records of {self.topic} arrived for {STALL_TIMEOUT_S:g}s though partitions {sorted(remaining)} "
                "have not reached their end; is the broker healthy, or were records deleted meanwhile?"
            )


class Fetches(Protocol):
    """What a replay reads records from: a PartitionReader (one process) or the replay group's consumer."""

    async def fetch_from(self, partitions: Iterable[int], timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """The next records of ``partitions``, by partition in offset order."""
        ...


async def gather(reader: Fetches, partitions: Collection[int], timeout_ms: int, batch: int) -> dict[int, list[RawRecord]]:
    """Up to a batch of each partition's records: what the first to have some brings, then what the others hold already.

    One fetch of ``batch`` records in all drained one partition at a time (the consumer's
    buffer holds far more than a batch of each), so every unit was one partition's batch,
    smaller than a live worker's, and the replay ran slower per event than one worker. The
    further fetches do not wait: they take what the consumer has buffered.
    """
    fetched = await reader.fetch_from(partitions, timeout_ms, batch)
    for partition in partitions:
        if partition not in fetched:
            fetched.update(await reader.fetch_from([partition], 0, batch))
    return fetched


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
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: give at least 1")
    if args.workers > 1:
        summary = await Workers(settings, args, start, to_time_ms).run(args.workers)
    else:
        from worker.collector import tune_for_throughput

        tune_for_throughput()
        store = state_store(args.state)
        try:
            summary = await Replay(settings, apps, store, topic=args.topic, start=start, to_time_ms=to_time_ms, group=args.group).run()
        finally:
            await store.close()
    print(orjson.dumps(summary.as_dict()).decode() if args.json else summary.render())
    return 0


# -- replay --workers N ------------------------------------------------------------------------


class Workers:
    """``replay --workers N``: N processes of one replay group, among which Kafka splits the partitions.

    Each process is ``rc-worker replay --group G`` (quiet, JSON summary): the group pins every
    partition's range when a process first takes it, so the processes together replay the
    range as it was at start, and running the same command with ``--group G`` again resumes.
    This process migrates the database once before they start, shows their progress from the
    group's committed offsets, and adds up their summaries.
    """

    def __init__(self, settings: Settings, args: argparse.Namespace, start: Start, to_time_ms: int | None) -> None:
        self.settings = settings
        self.args = args
        self.kafka = settings.kafka.model_copy(update={"topic": args.topic or settings.kafka.topic})
        self.start = start
        self.to_time_ms = to_time_ms
        self.group: str = args.group or f"rc-replay-{uuid.uuid4().hex[:12]}"

    def _command(self) -> list[str]:
        args = self.args
        options = ["--from-beginning"] if args.from_beginning else []
        for flag, value in (
            ("--from-offset", args.from_offset),
            ("--from-time", args.from_time),
            ("--to-time", args.to_time),
            ("--topic", args.topic),
            ("--handlers", args.handlers),
        ):
            if value is not None:
                options += [flag, value]
        config = ["--config", str(args.config)] if getattr(args, "config", None) else []
        return [
            sys.executable,
            "-m",
            "worker",
            *config,
            "replay",
            *options,
            "--state",
            args.state,
            "--group",
            self.group,
            "--json",
            "--quiet",
        ]

    async def run(self, count: int) -> ReplaySummary:
        """Run ``count`` processes to the end of the range; their summaries added up."""
        started = time.monotonic()
        async with PartitionReader(self.kafka, self.kafka.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
            spans = await plan(self.kafka, reader, self.start, self.to_time_ms)
        require_records(spans, self.kafka.topic, self.start, self.to_time_ms)
        store = state_store(self.args.state)
        try:
            await prepare(store)  # once: processes migrating a fresh database together would race
        finally:
            await store.close()
        log.info("replay_workers_started", topic=self.kafka.topic, group=self.group, workers=count)
        processes = [
            await asyncio.create_subprocess_exec(*self._command(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            for _ in range(count)
        ]
        try:
            outputs = await self._follow(processes, spans)
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        summary = self._add_up(processes, outputs)
        summary.partitions = sum(1 for span in spans.values() if span.size)  # a process counts those it held, rebalances twice
        summary.duration_s = time.monotonic() - started
        log.info("replay_finished", **summary.as_dict())
        return summary

    async def _follow(self, processes: list[asyncio.subprocess.Process], spans: dict[int, Span]) -> list[tuple[bytes, bytes]]:
        """Wait for the processes, moving the progress as the group's committed offsets move."""
        sizes = {p: span.size for p, span in spans.items() if span.size}
        waiting = asyncio.ensure_future(asyncio.gather(*(process.communicate() for process in processes)))
        with Progress("replay", sum(sizes.values()), unit="events", partitions=sizes) as progress:
            while not waiting.done():
                await asyncio.wait([waiting], timeout=WORKERS_POLL_S)
                try:
                    committed = await group_offsets(self.kafka, self.group, self.kafka.topic, CONNECT_TIMEOUT_S)
                except BrokerError:
                    continue  # the processes fail on their own if the broker is gone
                for partition, size in sizes.items():
                    pinned = _pinned(committed.get(partition))
                    done = min(size, max(0, pinned[0] - spans[partition].start)) if pinned else 0
                    if done > progress.partition_done[partition]:
                        progress.advance(done - progress.partition_done[partition], partition=partition)
        return waiting.result()

    def _add_up(self, processes: list[asyncio.subprocess.Process], outputs: list[tuple[bytes, bytes]]) -> ReplaySummary:
        failed = [(process.returncode, err) for process, (_, err) in zip(processes, outputs, strict=True) if process.returncode != 0]
        if failed:
            status, err = failed[0]
            said = err.decode(errors="replace").strip().splitlines()[-1:] or ["nothing"]
            raise WorkerError(
                f"{len(failed)} of {len(processes)} replay processes failed; one exited {status} saying: {said[0]}. "
                f"Run again with --group {self.group} to resume where they stopped"
            )
        summary = ReplaySummary(self.kafka.topic)
        for out, _ in outputs:
            part = orjson.loads(out.strip().splitlines()[-1])
            # A process's summary as one result: its dead letters are all counted as records'.
            result = BatchResult(next_offset=0, processed=part["events"], duplicates=part["duplicates"], skipped=part["skipped"])
            result.dead_lettered, result.conflicts, result.per_app = part["dead_letters"], part["conflicts"], dict(part["per_app"])
            summary.add(result, part["records"])
        return summary
