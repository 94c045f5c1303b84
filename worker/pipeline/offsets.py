"""Per-partition offsets ready to commit to Kafka: pure bookkeeping, no I/O.

A partition's batches commit to the database in offset order, so the next offset to commit
is the end of the last batch whose unit of work committed. Kafka's committed offset only
ever moves forward, and a partition that is revoked is forgotten at once.
"""

from __future__ import annotations


class OffsetTracker:
    """The next offset per partition that the database has, and which Kafka does not yet."""

    def __init__(self) -> None:
        self._done: dict[int, int] = {}
        self._committed: dict[int, int] = {}

    def mark(self, partition: int, next_offset: int) -> None:
        """Record that every record of ``partition`` before ``next_offset`` is committed in the database."""
        current = self._done.get(partition)
        if current is not None and next_offset < current:
            raise ValueError(f"partition {partition}: offset moved back from {current} to {next_offset}")
        self._done[partition] = next_offset

    def ready(self) -> dict[int, int]:
        """The offsets to commit to Kafka now (those that moved since the last commit)."""
        return {p: o for p, o in self._done.items() if self._committed.get(p) != o}

    def committed(self, offsets: dict[int, int]) -> None:
        """Record that Kafka has these offsets."""
        for partition, offset in offsets.items():
            if partition in self._done:
                self._committed[partition] = offset

    def forget(self, partitions: set[int]) -> None:
        """Drop revoked partitions: nothing more is committed for them."""
        for partition in partitions:
            self._done.pop(partition, None)
            self._committed.pop(partition, None)

    def position(self, partition: int) -> int | None:
        """The next offset to process for ``partition``, if any batch committed."""
        return self._done.get(partition)
