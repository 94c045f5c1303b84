"""One partition's batch as a unit of work sees it: its records decoded once, and how far it got.

A unit of work may span several partitions' batches (``combine.py``); each is a part, and
the commit advances each part's partition under its own fence to where that part got.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.errors import DecodeError
from worker.events import Event, RawRecord, decode
from worker.persistence.writes import Fence
from worker.pipeline.apprun import HandlerFailures


@dataclass(slots=True)
class Part:
    """One partition's batch in a unit of work that spans several partitions."""

    records: Sequence[RawRecord]
    fence: Fence | None
    decoded: list[tuple[RawRecord, Event | DecodeError]] = field(init=False)
    failures: HandlerFailures = field(default_factory=HandlerFailures)
    # How many of the records the unit processed: fewer than all when an event's handler
    # must back off, so the events before it commit now and the rest runs on its own.
    upto: int = field(init=False)

    def __post_init__(self) -> None:
        self.decoded = [(record, decode_or_reason(record)) for record in self.records]
        self.upto = len(self.records)

    @property
    def next_offset(self) -> int:
        """The offset after the last record the unit processed."""
        return self.records[self.upto - 1].offset + 1 if self.upto else self.records[0].offset

    @property
    def rest(self) -> Sequence[RawRecord]:
        """The records left to run on their own."""
        return self.records[self.upto :]


# What a commit advances: the first partition's fence and next offset (None: the fence is
# checked, the offset stays), then the others'.
Advances = tuple[Fence | None, int | None, list[tuple[Fence, int]]]


def advances_of(parts: Sequence[Part]) -> Advances:
    """What committing ``parts`` as one unit advances: the first part's partition, then the others'."""
    first, *rest = parts
    return first.fence, first.next_offset, [(p.fence, p.next_offset) for p in rest if p.fence is not None]


def decode_or_reason(record: RawRecord) -> Event | DecodeError:
    """The event, or the DecodeError saying why the record is none."""
    try:
        return decode(record)
    except DecodeError as exc:
        return exc
