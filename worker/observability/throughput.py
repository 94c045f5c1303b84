"""What a worker has done lately, as one periodic ``throughput`` log line a person can read.

The :class:`~worker.observability.metrics.Observer` adds each committed batch to a
:class:`Tally`; every ``observability.lag_interval_s`` the monitor logs what changed since
its last line (events/s, lag, conflicts, dead letters, duplicates). The per-batch
``batch_committed`` lines are at debug level.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Tally:
    """What this worker has done since it started."""

    records: int = 0  # fetched
    events: int = 0  # dispatched and committed, the duplicates among them
    duplicates: int = 0
    dead_letters: int = 0  # records and (app, event) pairs sent to the dead-letter topic
    conflicts: int = 0  # batch runs refused by a version check and run again


class Throughput:
    """The ``throughput`` line: rates and counts since the last line, from a :class:`Tally`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since = clock()
        self._last = Tally()

    def line(self, tally: Tally, lag: int | None, partitions: int) -> dict[str, Any]:
        """The fields of one line; the next line counts from here."""
        now = self._clock()
        seconds = max(now - self._since, 1e-9)
        last, self._last, self._since = self._last, Tally(**{k: getattr(tally, k) for k in Tally.__slots__}), now
        return {
            "events_per_s": round((tally.events - last.events) / seconds, 1),
            "records_per_s": round((tally.records - last.records) / seconds, 1),
            "events": tally.events - last.events,
            "duplicates": tally.duplicates - last.duplicates,
            "dead_letters": tally.dead_letters - last.dead_letters,
            "conflicts": tally.conflicts - last.conflicts,
            "lag": lag,
            "partitions": partitions,
            "interval_s": round(seconds, 1),
        }
