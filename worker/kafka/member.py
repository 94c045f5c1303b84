"""The worker's consumer-group membership: fetching, pausing, seeking and committing offsets on its assignment."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from worker.config import KafkaSettings
from worker.errors import BrokerError
from worker.events import RawRecord
from worker.kafka.client import client_options, close_client, close_quietly, group_state, raw_batches, translate

log = structlog.get_logger("worker.kafka")


PartitionsCallback = Callable[[set[int]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback) -> None:
        self._on_revoked = on_revoked
        self._on_assigned = on_assigned

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._on_revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._on_assigned({tp.partition for tp in assigned})


class Consumer:
    """A member of the consumer group on one topic; offsets are committed only when told."""

    def __init__(self, settings: KafkaSettings, *, group_id: str | None = None) -> None:
        self.topic = settings.topic
        self.group_id = group_id or settings.group_id
        self._settings = settings
        self._coordinator_lost: float | None = None
        self._consumer = AIOKafkaConsumer(
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            # How long the coordinator waits for members to rejoin. aiokafka's default is the
            # session timeout, but on revoke a member first finishes its lanes' batches (up to
            # processing.shutdown_timeout_s): one slower than that is dropped, rejoins, and
            # starts the next rebalance, round after round. Java binds it to max.poll.interval.ms.
            rebalance_timeout_ms=max(settings.session_timeout_ms, settings.max_poll_interval_ms),
            max_poll_records=settings.max_batch_records,
            # aiokafka sends one fetch per broker: while one waits out the long poll for idle
            # partitions, a partition resumed meanwhile is not fetched. Java's default (500 ms)
            # then stalls a busy partition each time it is resumed.
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            group_instance_id=None if group_id else settings.group_instance_id,
            **client_options(settings),
        )

    async def start(self, on_revoked: PartitionsCallback, on_assigned: PartitionsCallback) -> None:
        """Connect and join the group; the callbacks run inside every rebalance."""
        try:
            with translate(f"connecting to Kafka at {self._settings.bootstrap_servers}"):
                await self._consumer.start()
                self._consumer.subscribe([self.topic], listener=_Listener(on_revoked, on_assigned))
        except BaseException:
            await close_quietly(self._consumer)  # a half-started client keeps sockets and tasks
            raise

    async def stop(self) -> None:
        """Leave the group and close."""
        with translate("leaving the consumer group"):
            try:
                await self._consumer.stop()
            except asyncio.CancelledError:
                # aiokafka (0.14) awaits its own cancelled fetch tasks when it closes while a
                # broker is unreachable, and re-raises their cancellation: not ours, unless
                # this task is being cancelled. Its client was not closed then; close it.
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                await close_client(self._consumer)

    async def fetch(self, timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """Records by partition, each list in offset order; empty after ``timeout_ms`` idle.

        Raises:
            BrokerError: nothing came and the group coordinator has been unreachable for a
                while: aiokafka waits for it in silence, the worker says so.

        """
        with translate("fetching records"):
            batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        found = raw_batches(batches)
        if not found:
            self._check_coordinator()
        return found

    async def fetch_from(self, partitions: Iterable[int], timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        """The next records of ``partitions`` (assigned ones) only, by partition in offset order; as PartitionReader.fetch."""
        wanted = [TopicPartition(self.topic, p) for p in partitions]
        if not wanted:
            return {}
        with translate("fetching records"):
            batches = await self._consumer.getmany(*wanted, timeout_ms=timeout_ms, max_records=max_records)
        return raw_batches(batches)

    def _check_coordinator(self) -> None:
        # A coordinator is briefly unknown at start-up and when it moves: only an absence
        # longer than a heartbeat session is reported.
        state = group_state(self._consumer)
        if state is None or state[0]:
            self._coordinator_lost = None
            return
        now = time.monotonic()
        self._coordinator_lost = self._coordinator_lost or now
        waited = now - self._coordinator_lost
        if waited * 1000 >= self._settings.session_timeout_ms:
            raise BrokerError(
                f"the group coordinator of {self.group_id} at {self._settings.bootstrap_servers} has been unreachable "
                f"for {waited:.0f}s; waiting for the broker to come back (nothing is lost meanwhile)"
            )

    async def commit(self, offsets: dict[int, int], metadata: dict[int, str] | None = None) -> None:
        """Commit ``offsets`` (the next offset to read, per partition) for the group, with optional metadata."""
        if offsets:
            notes = metadata or {}
            state = group_state(self._consumer)
            if state is not None and not state[0]:
                # aiokafka would wait for the coordinator forever, and the loop with it.
                raise BrokerError("committing offsets failed: the group coordinator is unreachable; they are committed once it is back")
            # Bounded like a heartbeat session: a commit that waits longer holds up the loop, and
            # a coordinator that silent is gone (the next commit says so at once).
            limit_ms = min(self._settings.request_timeout_ms, self._settings.session_timeout_ms)
            try:
                with translate("committing offsets"):
                    async with asyncio.timeout(limit_ms / 1000):
                        await self._consumer.commit({TopicPartition(self.topic, p): (o, notes.get(p, "")) for p, o in offsets.items()})
            except TimeoutError:
                raise BrokerError(f"committing offsets failed: no answer within {limit_ms} ms") from None

    async def committed(self, partition: int) -> int | None:
        """The group's committed offset for ``partition``."""
        with translate("reading the committed offset"):
            offset: int | None = await self._consumer.committed(TopicPartition(self.topic, partition))
        return offset

    def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` from ``offset`` on."""
        self._consumer.seek(TopicPartition(self.topic, partition), offset)

    def pause(self, partition: int) -> None:
        """Fetch nothing more from ``partition`` until :meth:`resume`."""
        self._consumer.pause(TopicPartition(self.topic, partition))

    def paused(self) -> set[int]:
        """The partitions fetching is paused on."""
        return {tp.partition for tp in self._consumer.paused() if tp.topic == self.topic}

    def resume(self, partition: int) -> None:
        """Fetch from ``partition`` again."""
        self._consumer.resume(TopicPartition(self.topic, partition))

    def assignment(self) -> set[int]:
        """The partitions this member holds now."""
        return {tp.partition for tp in self._consumer.assignment()}

    async def end_offsets(self, partitions: Iterable[int]) -> dict[int, int]:
        """The log-end offset of each partition."""
        with translate("reading end offsets"):
            ends = await self._consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}

    async def lag(self) -> dict[int, int]:
        """Records between the fetch position and the log end, per assigned partition."""
        assigned = list(self._consumer.assignment())
        if not assigned:
            return {}
        with translate("measuring consumer lag"):
            ends = await self._consumer.end_offsets(assigned)
            return {tp.partition: max(0, ends[tp] - await self._consumer.position(tp)) for tp in assigned}

    def member_id(self) -> str | None:
        """The id the group coordinator gave this member (what ``describe_group_members`` lists), once joined."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        member_id = getattr(coordinator, "member_id", None)
        return member_id if isinstance(member_id, str) and member_id else None

    def in_group(self) -> bool:
        """Whether this member holds a generation of the group and can reach its coordinator."""
        state = group_state(self._consumer)
        return state is not None and state[0] and state[1] > 0
