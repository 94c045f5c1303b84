"""The worker: fetch a batch per partition, dispatch it, commit offsets; until told to stop.

One member of the consumer group. Partitions of one fetch are dispatched concurrently, each
in offset order; Kafka offsets are committed only up to what the database has committed.
Rebalances wait for the batch in flight (the lock), and every newly assigned partition is
claimed in the database first, which fences out its previous owner and tells where its
state ends. The outbox publisher runs beside the loop and sends what commits staged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator

import structlog
from structlog.contextvars import bound_contextvars

from worker.apps import App
from worker.config import Settings
from worker.constants import OUTBOX_ID_HEADER
from worker.dispatch import ConflictsExhausted, Dispatcher, Topics, backoff
from worker.errors import BrokerError, FencedError, PersistenceError
from worker.events import RawRecord
from worker.http import Http
from worker.kafka import Consumer, Producer
from worker.offsets import OffsetTracker
from worker.persistence.store import Fence, Store

log = structlog.get_logger("worker.runner")

OUTBOX_BATCH = 500
OUTBOX_IDLE_S = 1.0


class Worker:
    """One consumer-group member running the enabled apps."""

    def __init__(self, settings: Settings, apps: list[App], store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store.from_settings(settings.persistence)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.http = Http()
        kafka = settings.kafka
        self.dispatcher = Dispatcher(
            apps, self.store, self.http, Topics(kafka.dead_letter_topic, kafka.commands_topic), settings.processing
        )
        self.consumer = Consumer(kafka)
        self.producer = Producer(kafka)
        self.offsets = OffsetTracker()
        self.fences: dict[int, Fence] = {}
        self.stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # held by a batch in flight; a rebalance waits for it
        self._outbox_wakeup = asyncio.Event()

    def stop(self) -> None:
        """Ask the loop to finish the batch in flight, commit and leave the group."""
        if not self.stopping.is_set():
            log.info("worker_stopping")
            self.stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; returns once offsets are committed and the group is left."""
        kafka = self.settings.kafka
        async with self._running():
            while not self.stopping.is_set():
                batches = await self.consumer.fetch(kafka.fetch_timeout_ms, kafka.max_batch_records)
                if batches:
                    async with self._lock, asyncio.TaskGroup() as group:
                        for partition, records in batches.items():
                            group.create_task(self._process(partition, records))
                await self._commit_offsets()

    async def _process(self, partition: int, records: list[RawRecord]) -> None:
        """Dispatch one partition's batch until it commits, is fenced, or the worker stops."""
        with bound_contextvars(topic=self.consumer.topic, partition=partition):
            attempt = 0
            while (fence := self.fences.get(partition)) is not None:
                try:
                    result = await self.dispatcher.dispatch(records, fence)
                except FencedError as exc:
                    log.warning("partition_fenced", reason=str(exc))
                    self.fences.pop(partition, None)
                    return
                except (PersistenceError, ConflictsExhausted) as exc:
                    if self.stopping.is_set():
                        log.warning("batch_abandoned", reason=str(exc), first_offset=records[0].offset)
                        return
                    attempt += 1
                    log.warning("database_unavailable", reason=str(exc), attempt=attempt, first_offset=records[0].offset)
                    await asyncio.sleep(min(5.0, backoff(attempt, self.settings.processing) + 0.1 * attempt))
                    continue
                self.offsets.mark(partition, result.next_offset)
                log.info(
                    "batch_committed",
                    first_offset=records[0].offset,
                    next_offset=result.next_offset,
                    processed=result.processed,
                    duplicates=result.duplicates,
                    skipped=result.skipped,
                    dead_lettered=result.dead_lettered,
                    conflicts=result.conflicts,
                )
                self._outbox_wakeup.set()
                return

    async def _commit_offsets(self) -> None:
        ready = self.offsets.ready()
        if not ready:
            return
        try:
            await self.consumer.commit(ready)
        except BrokerError as exc:
            # The database already holds these offsets; Kafka's copy catches up next time.
            log.warning("offset_commit_failed", reason=str(exc), offsets=ready)
            return
        self.offsets.committed(ready)

    # -- rebalance -------------------------------------------------------------------------

    async def _on_revoked(self, partitions: set[int]) -> None:
        async with self._lock:
            ready = {p: o for p, o in self.offsets.ready().items() if p in partitions}
            with contextlib.suppress(BrokerError):
                await self.consumer.commit(ready)
            self.offsets.forget(partitions)
            for partition in partitions:
                self.fences.pop(partition, None)
        log.info("partitions_revoked", partitions=sorted(partitions))

    async def _on_assigned(self, partitions: set[int]) -> None:
        kafka = self.settings.kafka
        attempt = 0
        while True:
            try:
                claims = await self.store.claim(kafka.group_id, kafka.topic, sorted(partitions), self.owner)
                break
            except PersistenceError as exc:
                attempt += 1
                log.warning("database_unavailable", reason=str(exc), attempt=attempt, during="partition_claim")
                await asyncio.sleep(min(5.0, 0.1 * attempt))
        for partition, claim in claims.items():
            self.fences[partition] = claim.fence
            if claim.next_offset is not None:
                committed = await self.consumer.committed(partition)
                if committed is None or claim.next_offset > committed:
                    # The database is ahead of Kafka (a crash between the two commits): start
                    # where the state ends, so nothing is processed twice.
                    self.consumer.seek(partition, claim.next_offset)
        log.info(
            "partitions_assigned",
            partitions=sorted(partitions),
            generations={p: c.fence.generation for p, c in claims.items()},
        )

    # -- outbox ----------------------------------------------------------------------------

    async def _publish_outbox(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OUTBOX_IDLE_S):
                    await self._outbox_wakeup.wait()
            self._outbox_wakeup.clear()
            try:
                while await self._publish_pending():
                    pass
            except (BrokerError, PersistenceError) as exc:
                log.warning("outbox_publish_failed", reason=str(exc))
                await asyncio.sleep(1.0)

    async def _publish_pending(self) -> int:
        """Publish one chunk of the owned partitions' outbox; returns how many were sent."""
        owned = sorted(self.fences)
        if not owned:
            return 0
        pending = await self.store.pending_outbox(OUTBOX_BATCH, self.consumer.topic, owned)
        if not pending:
            return 0
        await self.producer.send_many(
            [(p.message.topic, p.message.key, p.message.value, _with_id(p.id, p.message.headers)) for p in pending]
        )
        await self.store.mark_published([p.id for p in pending])
        log.info("outbox_published", count=len(pending), first_id=pending[0].id)
        return len(pending)

    # -- lifecycle -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        await self.store.check_schema()
        async with self.producer:
            await self.consumer.start(self._on_revoked, self._on_assigned)
            log.info("worker_started", owner=self.owner, group=self.settings.kafka.group_id, topic=self.consumer.topic)
            publisher = asyncio.create_task(self._publish_outbox(), name="outbox-publisher")
            try:
                yield
            finally:
                await asyncio.shield(self._shutdown(publisher))

    async def _shutdown(self, publisher: asyncio.Task[None]) -> None:
        await self._commit_offsets()
        with contextlib.suppress(BrokerError, PersistenceError):
            while await self._publish_pending():
                pass
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        await self.consumer.stop()
        await self.http.aclose()
        await self.store.close()
        log.info("worker_stopped", owner=self.owner)


def _with_id(outbox_id: int, headers: tuple[tuple[str, bytes], ...]) -> list[tuple[str, bytes]]:
    return [*headers, (OUTBOX_ID_HEADER, str(outbox_id).encode())]
