"""Publish what committed units of work staged (commands, dead letters), once per outbox row.

Only the current owner of a source partition publishes that partition's rows, and it records
each row's target partition and that partition's end offset *before* the first send. A new
owner (after a crash or a rebalance) first reads the target partitions back from those
offsets, marks the rows a previous owner did publish, and sends only the rest: nothing is
lost and nothing is sent twice. Every record carries ``rc-outbox-id`` so readers can check.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import structlog

from worker.constants import OUTBOX_ID_HEADER
from worker.errors import RecordTooLargeError
from worker.kafka import Outgoing, Producer, Reader, record_bytes
from worker.persistence.store import Fence, PendingMessage, Store
from worker.pipeline.dead_letters import is_dead_letter, origin, truncate

log = structlog.get_logger("worker.outbox")

# Pending rows read per publishing round: a page to send, not a statement's row limit (persistence.sql.CHUNK).
PAGE = 500


def outbox_id(fence: Fence, row_id: int) -> bytes:
    """The header value naming one outbox row: the group keeps ids of two deployments apart."""
    return f"{fence.group_id}:{row_id}".encode()


class OutboxPublisher:
    """Publishes one source partition's outbox rows; shared by every partition of a worker."""

    def __init__(self, store: Store, producer: Producer, reader: Reader) -> None:
        self.store = store
        self.producer = producer
        self.reader = reader

    async def publish(self, fence: Fence) -> int:
        """Publish every pending row staged by ``fence``'s partition; returns how many were sent.

        Raises:
            FencedError: the partition has a new owner; it publishes the rest.
            BrokerError, PersistenceError: try again later; nothing is lost.

        """
        sent = 0
        while pending := await self.store.pending_outbox(fence.topic, fence.partition, PAGE):
            already = await self._read_back(fence, [p for p in pending if p.attempt_offset is not None])
            if already:
                await self.store.mark_published(sorted(already))
                log.info("outbox_recovered", partition=fence.partition, already_published=len(already))
            fresh = [p for p in pending if p.id not in already]
            if fresh:
                await self._send(fence, fresh)
                sent += len(fresh)
        return sent

    async def _send(self, fence: Fence, rows: Sequence[PendingMessage]) -> None:
        targets = [await self.producer.partition_for(r.message.topic, r.message.key, r.id) for r in rows]
        records, cut = [], []
        for row, target in zip(rows, targets, strict=True):
            headers = [*row.message.headers, (OUTBOX_ID_HEADER, outbox_id(fence, row.id))]
            record = Outgoing(row.message.topic, row.message.key, row.message.value, headers, target)
            records.append(await self._fitting(row, record))
            if records[-1] is not record:
                cut.append((row, records[-1]))
        ends = await self.reader.end_offsets({(r.message.topic, t) for r, t in zip(rows, targets, strict=True)})
        await self.store.record_attempts(fence, [(r.id, t, ends[(r.message.topic, t)]) for r, t in zip(rows, targets, strict=True)])
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
        log.info("outbox_published", partition=fence.partition, count=len(rows), first_id=rows[0].id)

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
