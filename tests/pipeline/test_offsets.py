"""OffsetTracker: which offsets the database has and Kafka does not yet (pure bookkeeping)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.pipeline.offsets import OffsetTracker


class TestReady:
    """What is ready to commit to Kafka."""

    def test_nothing_is_ready_before_any_batch_commits(self) -> None:
        """A fresh tracker has nothing to commit and no position."""
        tracker = OffsetTracker()
        assert tracker.ready() == {}
        assert tracker.position(0) is None

    def test_marked_offsets_are_ready_per_partition(self) -> None:
        """Each partition's latest next offset is ready."""
        tracker = OffsetTracker()
        tracker.mark(0, 10)
        tracker.mark(3, 5)
        tracker.mark(0, 25)
        assert tracker.ready() == {0: 25, 3: 5}
        assert tracker.position(0) == 25

    def test_committed_offsets_are_no_longer_ready(self) -> None:
        """Once Kafka has an offset, only partitions that moved since are ready."""
        tracker = OffsetTracker()
        tracker.mark(0, 10)
        tracker.mark(1, 7)
        tracker.committed({0: 10, 1: 7})
        assert tracker.ready() == {}
        tracker.mark(1, 9)
        assert tracker.ready() == {1: 9}

    def test_an_older_commit_leaves_the_newer_offset_ready(self) -> None:
        """A commit of an offset the partition has since moved past does not hide the newer one."""
        tracker = OffsetTracker()
        tracker.mark(0, 10)
        ready = tracker.ready()
        tracker.mark(0, 20)  # a batch committed while the Kafka commit was in flight
        tracker.committed(ready)
        assert tracker.ready() == {0: 20}

    def test_marking_the_same_offset_again_is_not_ready_twice(self) -> None:
        """A batch that ends where the last one did (nothing new) commits nothing."""
        tracker = OffsetTracker()
        tracker.mark(2, 4)
        tracker.committed({2: 4})
        tracker.mark(2, 4)
        assert tracker.ready() == {}

    def test_moving_back_is_refused(self) -> None:
        """An offset below the partition's position is a bug in the caller, not something to commit."""
        tracker = OffsetTracker()
        tracker.mark(1, 10)
        with pytest.raises(ValueError, match="partition 1: offset moved back from 10 to 9"):
            tracker.mark(1, 9)
        assert tracker.ready() == {1: 10}


class TestRevoke:
    """Revoked partitions are dropped at once."""

    def test_forgotten_partitions_are_never_ready(self) -> None:
        """After forget, a revoked partition has no offset and no position."""
        tracker = OffsetTracker()
        tracker.mark(0, 10)
        tracker.mark(1, 10)
        tracker.forget({0})
        assert tracker.ready() == {1: 10}
        assert tracker.position(0) is None

    def test_commit_of_a_forgotten_partition_is_ignored(self) -> None:
        """A commit that returns after the revoke does not resurrect the partition."""
        tracker = OffsetTracker()
        tracker.mark(0, 10)
        ready = tracker.ready()
        tracker.forget({0})
        tracker.committed(ready)
        assert tracker.ready() == {}
        tracker.mark(0, 3)  # reassigned later, starting lower: allowed, it is a new claim
        assert tracker.ready() == {0: 3}


class TestProperties:
    """Invariants over any sequence of marks and commits."""

    @given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 50), st.booleans()), max_size=60))
    def test_ready_is_always_the_latest_offset_not_yet_committed(self, steps: list[tuple[int, int, bool]]) -> None:
        """Ready holds exactly each partition's latest offset unless Kafka already has that offset."""
        tracker = OffsetTracker()
        latest: dict[int, int] = {}
        in_kafka: dict[int, int] = {}
        for partition, step, commit in steps:
            latest[partition] = latest.get(partition, 0) + step
            tracker.mark(partition, latest[partition])
            if commit:
                ready = tracker.ready()
                tracker.committed(ready)
                in_kafka.update(ready)
        assert tracker.ready() == {p: o for p, o in latest.items() if in_kafka.get(p) != o}
