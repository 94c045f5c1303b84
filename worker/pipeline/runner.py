"""The worker: fetch, hand each partition's batch to its lane, commit offsets; until stopped.

One member of the consumer group. The loop only fetches and commits: each assigned partition
has a lane (``lane.py``) that dispatches its batches in order and publishes its outbox, and
the partition is paused in Kafka while its lane's backlog is full. So the loop keeps polling (no
``max.poll.interval.ms`` expiry) however long one partition waits, and Kafka offsets are
committed only up to what the database has committed. A newly assigned partition is claimed
in the database first, which fences out its previous owner and tells where its state ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import structlog

from worker.apps.contract import App
from worker.apps.http import Http
from worker.apps.readers import Directory
from worker.config import Settings
from worker.errors import BrokerError, PersistenceError, WorkerError
from worker.events import RawRecord
from worker.kafka import Consumer, Producer, Reader
from worker.persistence.retention import pruning
from worker.persistence.store import Store
from worker.pipeline.combine import Combiner
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.pipeline.hooks import Hooks, contained
from worker.pipeline.lane import Lane
from worker.pipeline.offsets import OffsetTracker
from worker.pipeline.outbox import OutboxPublisher
from worker.pipeline.retry import until_committed
from worker.pipeline.status import Status

log = structlog.get_logger("worker.runner")


class Worker:
    """One consumer-group member running the enabled apps."""

    def __init__(self, settings: Settings, apps: list[App], store: Store | None = None, hooks: Hooks | None = None) -> None:
        self.settings = settings
        self.hooks = contained(hooks)
        self.store = store or Store.from_settings(settings.persistence)
        self.store.count_round_trips(self.hooks.database_round_trips)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.http = Http(settings.http)
        kafka = settings.kafka
        self.directory = Directory.from_settings(settings.rocketchat)
        self.dispatcher = Dispatcher(
            apps,
            self.store,
            self.http,
            Topics(kafka.dead_letter_topic, kafka.commands_topic),
            settings.processing,
            self.hooks,
            own_user_id=settings.rocketchat.app_user_id,
            directory=self.directory,
        )
        self.combiner = Combiner(self.dispatcher)
        self.consumer = Consumer(kafka)
        self.producer = Producer(kafka)
        self.reader = Reader(kafka)
        self.publisher = OutboxPublisher(self.store, self.producer, self.reader)
        self.offsets = OffsetTracker()
        self.lanes: dict[int, Lane] = {}
        self.stopping = asyncio.Event()
        self.failure: BaseException | None = None
        self.last_poll = time.monotonic()

    @property
    def status(self) -> Status:
        """The read-only view of this worker that health checks and the monitor ask."""
        return Status(self)

    def _lane_failed(self, exc: BaseException) -> None:
        # A bug, not an outage (those are retried inside the lane): stop, and let the process
        # exit non-zero so its supervisor restarts it, rather than sit on a paused partition.
        log.error("lane_failed", error_type=type(exc).__name__, error=str(exc), exc_info=exc)
        self.failure = self.failure or exc
        self.stop()

    def stop(self) -> None:
        """Ask the loop to finish the batches in flight, commit and leave the group."""
        if not self.stopping.is_set():
            log.info("worker_stopping")
            self.stopping.set()

    async def run(self) -> None:
        """Run until :meth:`stop`; returns once offsets are committed and the group is left."""
        kafka = self.settings.kafka
        async with self._running():
            while not self.stopping.is_set():
                batches = await self._fetch(kafka.fetch_timeout_ms, kafka.max_batch_records)
                self.hooks.polled(batches)
                for partition, records in batches.items():
                    self._hand_over(partition, records)
                await self._commit_offsets()
        if self.failure is not None:
            raise WorkerError(f"stopped because a partition's lane failed: {type(self.failure).__name__}: {self.failure}") from self.failure

    async def _fetch(self, timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        try:
            batches = await self.consumer.fetch(timeout_ms, max_records)
        except BrokerError as exc:
            log.warning("broker_unavailable", reason=str(exc))
            await asyncio.sleep(1.0)
            return {}
        self.last_poll = time.monotonic()
        return batches

    def _hand_over(self, partition: int, records: list[RawRecord]) -> None:
        lane = self.lanes.get(partition)
        if lane is None:
            # The fetch ran while a rebalance was claiming or releasing this partition, and
            # the consumer's position has already moved past these records: rewind, and hold
            # the partition until its lane exists (_on_assigned resumes it), or let the new
            # owner read them from the committed offset if it is gone.
            if partition in self.consumer.assignment():
                self.consumer.seek(partition, records[0].offset)
                self.consumer.pause(partition)
            log.info("records_deferred", partition=partition, first_offset=records[0].offset, count=len(records))
            return
        if not lane.submit(records):
            self.consumer.pause(partition)

    def _resume(self, partition: int) -> None:
        if partition in self.lanes:
            self.consumer.resume(partition)

    async def _commit_offsets(self, partitions: set[int] | None = None) -> None:
        ready = {p: o for p, o in self.offsets.ready().items() if partitions is None or p in partitions}
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
        self.hooks.revoked(partitions)
        lanes = [self.lanes.pop(p) for p in sorted(partitions) if p in self.lanes]
        timeout = self.settings.processing.shutdown_timeout_s
        await asyncio.gather(*(lane.close(timeout) for lane in lanes))
        await self._commit_offsets(partitions)
        self.offsets.forget(partitions)
        log.info("partitions_revoked", partitions=sorted(partitions))

    async def _on_assigned(self, partitions: set[int]) -> None:
        self.hooks.assigned(partitions)
        kafka = self.settings.kafka
        claims = await until_committed(
            lambda: self.store.claim(kafka.group_id, kafka.topic, sorted(partitions), self.owner),
            self.settings.processing,
            retry_on=(PersistenceError,),
            on_retry=lambda exc, attempt: log.warning("database_unavailable", reason=str(exc), attempt=attempt, during="partition_claim"),
        )
        if claims is None:  # pragma: no cover - an unbounded loop returns or raises
            return
        for partition, claim in claims.items():
            if claim.next_offset is not None:
                committed = await self.consumer.committed(partition)
                if committed is None or claim.next_offset > committed:
                    # The database is ahead of Kafka (a crash between the two commits): start
                    # where the state ends, so nothing is processed twice.
                    self.consumer.seek(partition, claim.next_offset)
            self.consumer.resume(partition)
            self.lanes[partition] = Lane(
                claim.fence,
                self.dispatcher,
                self.publisher,
                self.offsets,
                self.settings.processing,
                self._resume,
                self._lane_failed,
                combiner=self.combiner,
                batch_records=kafka.max_batch_records,
            )
        log.info(
            "partitions_assigned",
            partitions=sorted(partitions),
            generations={p: c.fence.generation for p, c in claims.items()},
        )

    # -- lifecycle -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncIterator[None]:
        await self.store.check_schema()
        async with self.producer, self.reader:
            await self.consumer.start(self._on_revoked, self._on_assigned)
            log.info("worker_started", owner=self.owner, group=self.settings.kafka.group_id, topic=self.consumer.topic)
            try:
                async with pruning(self.store, self.settings.persistence, self.hooks):
                    yield
            finally:
                await asyncio.shield(self._shutdown())

    async def _shutdown(self) -> None:
        lanes, self.lanes = list(self.lanes.values()), {}
        await asyncio.gather(*(lane.close(self.settings.processing.shutdown_timeout_s) for lane in lanes))
        await self._commit_offsets()
        await self.consumer.stop()
        await self.http.aclose()
        await self.directory.aclose()
        await self.store.close()
        log.info("worker_stopped", owner=self.owner)
