"""How a replay cuts what one fetch brought into units: a batch per partition at most, in order."""

from __future__ import annotations

from worker.events import RawRecord
from worker.tools.replay import _rounds


def records(partition: int, count: int) -> list[RawRecord]:
    return [RawRecord("t", partition, offset, 0, None, b"{}", ()) for offset in range(count)]


def test_each_round_holds_at_most_a_batch_of_each_partition_and_rounds_keep_offset_order() -> None:
    fetched = {0: records(0, 1200), 1: records(1, 300), 2: records(2, 500)}
    rounds = list(_rounds(fetched, 500))
    assert [{p: len(batch) for p, batch in r.items()} for r in rounds] == [{0: 500, 1: 300, 2: 500}, {0: 500}, {0: 200}]
    for partition, whole in fetched.items():
        assert [record for r in rounds for record in r.get(partition, [])] == whole


def test_nothing_fetched_makes_no_round() -> None:
    assert list(_rounds({}, 500)) == []
