"""What one round of a replay takes from the consumer: up to a batch of every partition that has records."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from worker.events import RawRecord
from worker.tools.replay import gather


class Buffered:
    """A reader over records already fetched, drained as aiokafka's getmany drains: partition by partition, ``max_records`` in all."""

    def __init__(self, counts: dict[int, int]) -> None:
        self.buffers = {p: [RawRecord("t", p, offset, 0, None, b"{}", ()) for offset in range(n)] for p, n in counts.items()}
        self.waits: list[int] = []

    async def fetch_from(self, partitions: Iterable[int], timeout_ms: int, max_records: int) -> dict[int, list[RawRecord]]:
        self.waits.append(timeout_ms)
        found: dict[int, list[RawRecord]] = {}
        for partition in partitions:
            taken = self.buffers[partition][:max_records]
            if taken:
                found[partition] = taken
                self.buffers[partition] = self.buffers[partition][len(taken) :]
                max_records -= len(taken)
            if not max_records:
                break
        return found


async def test_a_round_takes_a_batch_of_each_partition_not_only_of_the_first() -> None:
    reader: Any = Buffered({0: 1200, 1: 700, 2: 0, 3: 100})
    first = await gather(reader, [0, 1, 2, 3], 500, 500)
    assert {p: (records[0].offset, len(records)) for p, records in first.items()} == {0: (0, 500), 1: (0, 500), 3: (0, 100)}
    assert reader.waits[0] == 500  # only the first fetch waits for records
    assert set(reader.waits[1:]) == {0}
    second = await gather(reader, [0, 1, 2, 3], 500, 500)
    assert {p: (records[0].offset, len(records)) for p, records in second.items()} == {0: (500, 500), 1: (500, 200)}
