"""Publish what committed units of work staged (commands, dead letters), once per outbox row.

Only the current owner of a source partition publishes that partition's rows, and it records
each row's target partition and that partition's end offset *before* the first send. A new
owner (after a crash or a rebalance) first reads the target partitions back from those
offsets, marks the rows a previous owner did publish, and sends only the rest: nothing is
lost and nothing is sent twice. Every record carries ``rc-outbox-id`` so readers can check.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from worker.constants import OUTBOX_ID_HEADER
from worker.errors import BrokerError, RecordTooLargeError, WorkerError
from worker.kafka import Outgoing, Producer, Reader, record_bytes
from worker.persistence.store import Fence, PendingMessage, Store
from worker.pipeline.dead_letters import is_dead_letter, origin, truncate

log = structlog.get_logger("worker.outbox")

# Pending rows read per publishing round: a page to send, not a statement's row limit (persistence.sql.CHUNK).
PAGE = 500


def _first_ids(rows: Sequence[PendingMessage]) -> dict[int | None, tuple[int, int]]:
    # Each source partition's first row id and row count, for its outbox_published line.
    found: dict[int | None, tuple[int, int]] = {}
    for row in rows:
        first, count = found.get(row.source_partition, (row.id, 0))
        found[row.source_partition] = (first, count + 1)
    return found


def outbox_id(fence: Fence, row_id: int) -> bytes:
    """The header value naming one outbox row: the group keeps ids of two deployments apart."""
    return f"{fence.group_id}:{row_id}".encode()


@dataclass(slots=True)
class _Request:
    fence: Fence
    future: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class OutboxPublisher:
    """Publishes one source partition's outbox rows; shared by every partition of a worker.

    The lanes of one shared unit of work (``combine``) ask to publish at about the same time;
    whoever's turn it is serves every partition waiting then, in one round: one read of their
    rows, one record of the attempts under all their fences, one send and one mark. A round
    per partition cost six of each after every unit.
    """

    def __init__(self, store: Store, producer: Producer, reader: Reader) -> None:
        self.store = store
        self.producer = producer
        self.reader = reader
        self._waiting: list[_Request] = []
        self._turn = asyncio.Lock()

    async def publish(self, fence: Fence) -> int:
        """Publish every pending row staged by ``fence``'s partition; returns how many were sent.

        Raises:
            FencedError: the partition has a new owner; it publishes the rest.
            BrokerError, PersistenceError: try again later; nothing is lost.

        """
        request = _Request(fence)
        self._waiting.append(request)
        await asyncio.sleep(0)  # the lanes one unit released hand theirs in first, as in combine
        async with self._turn:
            if not request.future.done():
                taken, self._waiting = self._waiting, []
                await self._serve(taken)
        return request.future.result()

    async def _serve(self, taken: list[_Request]) -> None:
        try:
            if len(taken) > 1:
                try:
                    sent = await self._publish([r.fence for r in taken])
                except WorkerError as exc:
                    # One partition fenced, or an outage: each finds out (and waits) alone.
                    log.info("outbox_round_failed", partitions=len(taken), error_type=type(exc).__name__, reason=str(exc))
                else:
                    for request in taken:
                        request.future.set_result(sent[request.fence.partition])
                    return
            for request in taken:
                try:
                    request.future.set_result(sum((await self._publish([request.fence])).values()))
                except Exception as exc:  # noqa: BLE001 - raised to the lane that asked, as if it had published alone
                    request.future.set_exception(exc)
        finally:
            for request in taken:  # cancelled (a lane closing) while serving others: they try again
                if not request.future.done():
                    request.future.set_exception(BrokerError("publishing was interrupted; the outbox is published again"))

    async def _publish(self, fences: Sequence[Fence]) -> dict[int, int]:
        """Publish the pending rows of ``fences``' partitions (of one topic); how many each sent."""
        sent = {fence.partition: 0 for fence in fences}
        while pending := await self.store.pending_outbox(fences[0].topic, sorted(sent), PAGE):
            already = await self._read_back(fences[0], [p for p in pending if p.attempt_offset is not None])
            if already:
                await self.store.mark_published(sorted(already))
                log.info("outbox_recovered", partitions=sorted(sent), already_published=len(already))
            fresh = [p for p in pending if p.id not in already]
            if fresh:
                await self._send(fences, fresh)
                for row in fresh:
                    sent[row.source_partition if row.source_partition is not None else fences[0].partition] += 1
            if len(pending) < PAGE:
                break  # all there was: the partitions' lanes stage more only after this returns
        return sent

    async def _send(self, fences: Sequence[Fence], rows: Sequence[PendingMessage]) -> None:
        fence = fences[0]  # the ids name the group, which the fences share
        targets = [await self.producer.partition_for(r.message.topic, r.message.key, r.id) for r in rows]
        records, cut = [], []
        for row, target in zip(rows, targets, strict=True):
            headers = [*row.message.headers, (OUTBOX_ID_HEADER, outbox_id(fence, row.id))]
            record = Outgoing(row.message.topic, row.message.key, row.message.value, headers, target)
            records.append(await self._fitting(row, record))
            if records[-1] is not record:
                cut.append((row, records[-1]))
        ends = await self.reader.end_offsets({(r.message.topic, t) for r, t in zip(rows, targets, strict=True)})
        await self.store.record_attempts(fences, [(r.id, t, ends[(r.message.topic, t)]) for r, t in zip(rows, targets, strict=True)])
        # A RecordTooLargeError here means a topic takes less than it said: the producer forgets
        # what it knew, and the next try (the lane retries) cuts to the new limit.
        await self.producer.send_many(records)
        await self.store.mark_published([r.id for r in rows])
        for row, letter in cut:
            log.warning(
                "dead_letter_truncated",
                **origin(letter.headers),
                dead_letter_topic=letter.topic,
                outbox_id=row.id,
                original_value_bytes=len(row.message.value),
                kept_value_bytes=len(letter.value),
                limit_bytes=await self.producer.max_record_bytes(letter.topic),
            )
        for partition, first in sorted(_first_ids(rows).items()):
            log.info("outbox_published", partition=partition, count=first[1], first_id=first[0])

    async def _fitting(self, row: PendingMessage, record: Outgoing) -> Outgoing:
        """``record``, or if its topic cannot take it and it is a dead letter, that cut to fit (see worker.pipeline.dead_letters).

        Raises:
            RecordTooLargeError: a command too large (never cut), or a dead letter that does not
                fit even cut; nothing is sent, and the partition's outbox waits.

        """
        limit = await self.producer.max_record_bytes(record.topic)
        size = record_bytes(record.key, record.value, record.headers)
        if size <= limit:
            return record
        letter = truncate(record, limit) if is_dead_letter(record.headers) else None
        if letter is None:
            what = "dead letter, even cut to its rc-dlq-* headers," if is_dead_letter(record.headers) else "command"
            raise RecordTooLargeError(
                f"outbox row {row.id} ({what} of {size} bytes) is larger than the {limit} bytes {record.topic} takes; raise its "
                "max.message.bytes and kafka.producer_max_request_bytes: this partition's outbox waits until then"
            )
        return letter

    async def _read_back(self, fence: Fence, attempted: Sequence[PendingMessage]) -> set[int]:
        """Ids of ``attempted`` rows that an earlier owner did publish."""
        if not attempted:
            return set()
        starts: dict[tuple[str, int], int] = defaultdict(lambda: 2**62)
        for row in attempted:
            if row.target_partition is None or row.attempt_offset is None:
                continue  # never attempted: nothing to read back
            key = (row.message.topic, row.target_partition)
            starts[key] = min(starts[key], row.attempt_offset)
        ends = await self.reader.end_offsets(starts)
        wanted = {outbox_id(fence, row.id): row.id for row in attempted}
        found: set[int] = set()
        for (topic, partition), start in starts.items():
            for record in await self.reader.read_range(topic, partition, start, ends[(topic, partition)]):
                row_id = wanted.get(record.header(OUTBOX_ID_HEADER) or b"")
                if row_id is not None:
                    found.add(row_id)
        return found
