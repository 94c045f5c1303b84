"""What one committed batch did: counts of outcomes, the one place they are summed."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast, overload

_T = TypeVar("_T")


@dataclass(slots=True)
class BatchResult:
    """What one committed batch did; the runner counts and logs it."""

    next_offset: int
    processed: int = 0
    duplicates: int = 0
    skipped: int = 0
    dead_lettered: int = 0
    conflicts: int = 0
    staged_outbox: int = 0
    locked: bool = False
    per_app: dict[str, int] = field(default_factory=dict)
    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (app, processed|skipped|duplicate|dead_lettered)

    def add(self, other: BatchResult) -> None:
        """Fold in the result of a part of this batch (when a batch is split)."""
        self.processed += other.processed
        self.duplicates += other.duplicates
        self.skipped += other.skipped
        self.dead_lettered += other.dead_lettered
        self.conflicts += other.conflicts
        self.staged_outbox += other.staged_outbox
        self.locked = self.locked or other.locked
        for app_id, count in other.per_app.items():
            self.per_app[app_id] = self.per_app.get(app_id, 0) + count
        self.outcomes.update(other.outcomes)

    @property
    def dead_letters(self) -> int:
        """Records dead-lettered whole, and events an app failed for good (one per app)."""
        return self.dead_lettered + self.outcomes_of("dead_lettered")

    def outcomes_of(self, outcome: str) -> int:
        """Events of every app with this outcome (processed, skipped, duplicate, dead_lettered)."""
        return sum(n for (_, which), n in self.outcomes.items() if which == outcome)

    @classmethod
    def total(cls, results: Iterable[BatchResult]) -> BatchResult:
        """Every result of ``results`` summed, as one."""
        summed = cls(next_offset=0)
        for result in results:
            summed.add(result)
            summed.next_offset = result.next_offset
        return summed

    def log_fields(self) -> dict[str, int | bool]:
        """What a batch_committed log line says about this batch."""
        return {
            "next_offset": self.next_offset,
            "processed": self.processed,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "dead_lettered": self.dead_lettered,
            "conflicts": self.conflicts,
            "locked": self.locked,
        }


class Summed(Protocol):
    """What keeps a running :class:`BatchResult` of the batches it has seen (the replay's summary)."""

    total: BatchResult


class TotalOf(Generic[_T]):
    """An attribute that reads one figure of its holder's summed ``total``.

    A summary shows the tally's figures under the names its users know (``events`` for
    ``processed``) without keeping or summing any of them again.
    """

    def __init__(self, figure: str, doc: str) -> None:
        self.figure = figure
        self.__doc__ = doc

    @overload
    def __get__(self, holder: None, owner: type[Any]) -> TotalOf[_T]: ...

    @overload
    def __get__(self, holder: Summed, owner: type[Any]) -> _T: ...

    def __get__(self, holder: Summed | None, owner: type[Any]) -> TotalOf[_T] | _T:
        if holder is None:
            return self
        return cast(_T, getattr(holder.total, self.figure))
