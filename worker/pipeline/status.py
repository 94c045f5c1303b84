"""A read-only view of a running worker, for those who watch it: health checks, the monitor, pages.

They ask these questions instead of reading the runner's attributes, so the pipeline can change
how it keeps its state without breaking what watches it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from worker.kafka import Consumer
from worker.persistence.store import Store
from worker.pipeline.lane import Lane


@dataclass(frozen=True, slots=True)
class LaneStatus:
    """One assigned partition's lane as a status shows it."""

    partition: int
    generation: int
    paused: bool  # held in Kafka: the runner pauses a partition while its lane's backlog is full
    busy: bool  # a batch in flight
    attempt: int  # failed attempts of the batch in flight (0: none, or it committed)
    last_error: str | None  # "Type: message" of the last failed attempt, secrets redacted
    last_error_at: float | None  # epoch seconds
    seconds_since_progress: float  # since the lane began or last committed a batch


class Watched(Protocol):
    """The parts of a running worker (the runner's :class:`~worker.pipeline.runner.Worker`) a status reads."""

    owner: str
    consumer: Consumer
    store: Store
    lanes: dict[int, Lane]
    stopping: asyncio.Event
    last_poll: float


class Status:
    """What may be asked of one worker; nothing here changes it."""

    def __init__(self, worker: Watched) -> None:
        self._worker = worker

    @property
    def group_id(self) -> str:
        """The consumer group the worker is a member of."""
        return self._worker.consumer.group_id

    @property
    def topic(self) -> str:
        """The event topic it consumes."""
        return self._worker.consumer.topic

    @property
    def owner(self) -> str:
        """The worker's name, as its partition claims in the database record it."""
        return self._worker.owner

    @property
    def store(self) -> Store:
        """The worker's store, for observers that record something about the worker (its member row)."""
        return self._worker.store

    def member_id(self) -> str | None:
        """The id the group coordinator gave the worker, once joined."""
        return self._worker.consumer.member_id()

    def lanes(self) -> list[LaneStatus]:
        """Each assigned partition's lane, by partition."""
        now, paused = time.monotonic(), self._worker.consumer.paused()
        return [
            LaneStatus(
                lane.partition,
                lane.fence.generation,
                lane.partition in paused,
                lane.busy,
                lane.attempt,
                lane.last_error,
                lane.last_error_at,
                round(now - lane.last_progress, 3),
            )
            for lane in sorted(self._worker.lanes.values(), key=lambda lane: lane.partition)
        ]

    def stopping(self) -> bool:
        """Whether the worker has been asked to stop."""
        return self._worker.stopping.is_set()

    def busy_partitions(self) -> int:
        """How many partitions have a batch in flight."""
        return sum(1 for lane in list(self._worker.lanes.values()) if lane.busy)

    def seconds_since_poll(self) -> float:
        """Seconds since the last successful fetch."""
        return time.monotonic() - self._worker.last_poll

    def in_group(self) -> bool:
        """Whether the worker reaches its group coordinator as a member."""
        return self._worker.consumer.in_group()

    async def check_database(self) -> None:
        """Ask the database a cheap question; raises PersistenceError when it does not answer."""
        await self._worker.store.stored_offsets(self.group_id, self.topic)

    async def lag(self) -> dict[int, int]:
        """Records between the worker's position and the log end, per assigned partition."""
        return await self._worker.consumer.lag()

    async def outbox_backlog(self) -> int:
        """Outbox rows committed but not yet published."""
        return await self._worker.store.outbox_backlog()
