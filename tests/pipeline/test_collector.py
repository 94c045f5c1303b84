"""The collector settings a worker runs with: young collections every few batches, start-up frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker import collector


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored")
def test_tuning_raises_the_thresholds_and_freezes_what_start_up_built() -> None:
    """After tuning, the young threshold is the worker's and the objects alive then are frozen."""
    gc.unfreeze()
    built_at_start_up = [object() for _ in range(10)]
    collector.tune_for_throughput()
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, collector.MIDDLE_EVERY, collector.FULL_EVERY)
    assert gc.get_freeze_count() >= len(built_at_start_up)


@pytest.mark.usefixtures("restored")
def test_young_collections_still_run_on_their_own_after_tuning() -> None:
    """Tuning spaces collections out; it does not turn them off: cycles made while running are freed."""
    collector.tune_for_throughput()
    before = gc.get_stats()[0]["collections"]
    kept = [[] for _ in range(collector.YOUNG_THRESHOLD * 2)]  # container allocations count toward the threshold
    assert gc.isenabled()
    assert gc.get_stats()[0]["collections"] > before, f"no young collection after {len(kept)} allocations"
