"""Values kept in memory (snapshots, units, outbox rows) cost about their length."""

from __future__ import annotations

import tracemalloc

from worker.persistence.values import COMPACT_BELOW, compact, encode_data


def _allocated_by(build: int) -> tuple[int, list[bytes]]:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [encode_data({"count": n}) for n in range(build)]
        return tracemalloc.get_traced_memory()[0] - before, kept
    finally:
        tracemalloc.stop()


def test_a_small_encoded_value_holds_about_its_own_length() -> None:
    """A thousand counters' data hold kilobytes, not the 4 KiB orjson allocates for each."""
    allocated, kept = _allocated_by(1_000)
    assert kept[7] == b'{"count":7}'
    assert allocated < 1_000 * 200, f"{allocated} bytes held by 1,000 values of about 15 bytes"


def test_compact_keeps_a_large_value_as_it_is() -> None:
    """A value over the threshold is returned itself: copying it would cost more than it frees."""
    large = b"x" * COMPACT_BELOW
    small = b'{"a":1}'
    assert compact(large) is large
    assert compact(small) == small
