"""One assigned partition: its batches dispatched in order, then its outbox published.

Each partition the worker holds gets a lane, a task of its own, so a partition that waits
(handler retries, a database outage) never holds up the others or the fetch loop. Records
fetched while a batch runs wait in the lane's backlog, and its next batch takes up to a
batch's worth of them at once. The runner pauses the partition in Kafka only when the backlog
is full (``BACKLOG_BATCHES`` batches), and the lane resumes it once it has drained to one
batch: pausing after every batch made a busy partition wait, each time it was resumed, for
the broker's long poll (``kafka.fetch_max_wait_ms``) of the fetch already in flight for the
idle ones. A lane is closed when its partition is revoked: it finishes or abandons its
batch, drops its backlog, and after that commits nothing (its fence is stale anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import structlog
from structlog.contextvars import bound_contextvars

from worker import tracing
from worker.config import ProcessingSettings
from worker.errors import BrokerError, DataError, FencedError, PersistenceError
from worker.events import RawRecord
from worker.logs import redact
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Fence
from worker.pipeline.combine import Combiner
from worker.pipeline.dispatch import ConflictsExhausted, Dispatcher
from worker.pipeline.offsets import OffsetTracker
from worker.pipeline.outbox import OutboxPublisher
from worker.pipeline.retry import until_committed
from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.lane")

# How often an idle lane retries publishing an outbox that failed to publish.
OUTBOX_RETRY_S = 1.0
# After a conflict, this many batches start locked: contention on a hot key comes in runs,
# and a locked batch waits its turn instead of being run again and again.
LOCKED_BATCHES_AFTER_CONFLICT = 20
# The backlog a lane holds before the runner pauses its partition, in batches (see above).
BACKLOG_BATCHES = 4
# The status shows this much of a failure's message: enough to recognise it, not a dump.
MAX_ERROR_CHARS = 500


class Lane:
    """The task that owns one partition's processing while this worker holds it."""

    def __init__(
        self,
        fence: Fence,
        dispatcher: Dispatcher,
        publisher: OutboxPublisher,
        offsets: OffsetTracker,
        settings: ProcessingSettings,
        on_ready: Callable[[int], None],
        on_failure: Callable[[BaseException], None],
        combiner: Combiner | None = None,
        batch_records: int = 500,
    ) -> None:
        self.fence = fence
        self._combiner = combiner
        self.partition = fence.partition
        self._dispatcher = dispatcher
        self._publisher = publisher
        self._offsets = offsets
        self._settings = settings
        self._on_ready = on_ready
        self._batch_records = batch_records
        self._backlog: deque[list[RawRecord]] = deque()
        self._backlogged = 0  # records in the backlog
        self._arrived = asyncio.Event()
        self.paused = False  # by the runner, because the backlog is full
        self._closed = asyncio.Event()
        self._outbox_dirty = True  # a new owner first publishes what the last one left
        self.busy = False
        # What the status reports of this lane (read-only outside it).
        self.last_progress = time.monotonic()  # when the lane began or last committed a batch
        self._locked_batches = 0
        self._snapshot = Snapshot()  # what this partition's last commit left in the database
        # What a status shows of this lane: the failed tries of the batch in flight (0: none),
        # and the last failure as "Type: message" without secrets.
        self.attempt = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None  # epoch seconds
        self.task = asyncio.create_task(self._run(), name=f"lane-{fence.topic}-{fence.partition}")
        # A lane that dies would hold its partition paused forever, silently: surface it.
        self.task.add_done_callback(lambda task: None if task.cancelled() or task.exception() is None else on_failure(task.exception()))  # type: ignore[arg-type]

    def submit(self, records: list[RawRecord]) -> bool:
        """Add fetched records to the backlog; False when it is full and the partition must pause."""
        self.busy = True
        self._backlog.append(records)
        self._backlogged += len(records)
        self._arrived.set()
        self.paused = self._backlogged >= BACKLOG_BATCHES * self._batch_records
        return not self.paused

    async def close(self, timeout_s: float) -> None:
        """Finish the batch in flight (or abandon it after ``timeout_s``) and stop."""
        self._closed.set()
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self.task)
        except TimeoutError:
            log.warning("lane_abandoned", partition=self.partition, reason=f"batch still running after {timeout_s}s")
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _run(self) -> None:
        with bound_contextvars(topic=self.fence.topic, partition=self.partition):
            while not self._closed.is_set():
                records = await self._next_batch()
                if records is not None:
                    await self._process(records)
                    self.busy, self.attempt = bool(self._backlog), 0
                if self._outbox_dirty and not self._closed.is_set():
                    await self._publish()
            if self._outbox_dirty:  # last chance while still the owner; else the next owner sends
                await self._publish()

    async def _next_batch(self) -> list[RawRecord] | None:
        if not self._backlog:
            arrived = asyncio.ensure_future(self._arrived.wait())
            closed = asyncio.ensure_future(self._closed.wait())
            await asyncio.wait({arrived, closed}, timeout=OUTBOX_RETRY_S, return_when=asyncio.FIRST_COMPLETED)
            arrived.cancel()
            closed.cancel()
            if not self._backlog or self._closed.is_set():
                return None
        self._arrived.clear()
        records = self._take()
        if self.paused and self._backlogged <= self._batch_records:
            # Resumed while a batch still waits, so that the fetch (and the broker's long
            # poll) runs while this one is processed, not after it.
            self.paused = False
            self._on_ready(self.partition)
        return records

    def _take(self) -> list[RawRecord]:
        # Up to a batch of the oldest records, in offset order, as one batch.
        records = self._backlog.popleft()
        while self._backlog and len(records) + len(self._backlog[0]) <= self._batch_records:
            records = records + self._backlog.popleft()
        self._backlogged -= len(records)
        return records

    async def _process(self, records: list[RawRecord]) -> None:
        """Dispatch one batch until it commits, is fenced, or the lane is closed."""

        async def attempt() -> BatchResult:
            with tracing.span("rc_worker.batch", topic=self.fence.topic, partition=self.partition, records=len(records)):
                locked = self._locked_batches > 0
                if self._combiner is not None:
                    return await self._combiner.dispatch(records, self.fence, snapshot=self._snapshot, locked=locked)
                return await self._dispatcher.dispatch(records, self.fence, locked=locked, snapshot=self._snapshot)

        try:
            result = await until_committed(
                attempt,
                self._settings,
                # Besides outages, a bug below (an error nothing translated) must stall this
                # partition loudly and try again, not end its lane in silence with it paused.
                retry_on=(Exception,),
                give_up_on=(FencedError,),
                on_retry=lambda exc, tries: self._failed(exc, tries, records[0].offset),
                running=lambda: not self._closed.is_set(),
                sleep=self._sleep,
            )
        except FencedError as exc:
            log.warning("partition_fenced", reason=str(exc))
            self._closed.set()
            return
        if result is None:
            log.warning("batch_abandoned", first_offset=records[0].offset, reason="partition revoked or worker stopping")
            return
        self._committed(result, records[0].offset)

    def _failed(self, exc: Exception, attempt: int, first_offset: int) -> None:
        self.attempt, self.last_error_at = attempt, time.time()
        self.last_error = f"{type(exc).__name__}: {redact(str(exc))}"[:MAX_ERROR_CHARS]
        self._snapshot.clear()  # the database may come back changed (a restore, a reset)
        # A DataError here refused even a bare dead letter (the dispatcher isolates the rest):
        # a bug to surface, not an outage to wait out quietly.
        if isinstance(exc, PersistenceError | ConflictsExhausted) and not isinstance(exc, DataError):
            log.warning("database_unavailable", reason=str(exc), attempt=attempt, first_offset=first_offset)
        else:
            log.error(
                "batch_failed", error_type=type(exc).__name__, error=str(exc), attempt=attempt, first_offset=first_offset, exc_info=exc
            )

    def _committed(self, result: BatchResult, first_offset: int) -> None:
        self.attempt = 0
        self._locked_batches = LOCKED_BATCHES_AFTER_CONFLICT if result.conflicts else max(0, self._locked_batches - 1)
        self._offsets.mark(self.partition, result.next_offset)
        self.last_progress = time.monotonic()
        self._dispatcher.hooks.batch_committed(result)
        self._outbox_dirty = self._outbox_dirty or result.staged_outbox > 0
        # Per batch, so at debug: the periodic `throughput` line (observability) is what a person reads.
        log.debug("batch_committed", first_offset=first_offset, **result.log_fields())

    async def _publish(self) -> None:
        try:
            await self._publisher.publish(self.fence)
        except FencedError as exc:
            log.warning("partition_fenced", reason=str(exc))
            self._closed.set()
        except (BrokerError, PersistenceError) as exc:
            log.warning("outbox_publish_failed", reason=str(exc))
        except Exception as exc:  # as in _process: retried (the lane keeps it dirty), never silent
            log.error("outbox_publish_failed", reason=f"{type(exc).__name__}: {exc}", exc_info=exc)
        else:
            self._outbox_dirty = False

    async def _sleep(self, seconds: float) -> None:
        # Wakes early when the lane is closed, so a revoke never waits for a long backoff.
        try:
            async with asyncio.timeout(seconds):
                await self._closed.wait()
        except TimeoutError:
            pass
