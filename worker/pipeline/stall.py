"""One stall detector: how long something has not moved, judged against a limit.

The worker's liveness (the event loop, the fetching, the processing) and the tools that
read a range to its end (replay) ask the same question, "has this stood still too long?",
so they ask it of this one class.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Stall:
    """Remembers when something last moved; stalled once it stood still longer than ``limit_s``."""

    def __init__(self, limit_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = limit_s
        self._clock = clock
        self.since = clock()

    def moved(self, at: float | None = None) -> None:
        """It moved now (or at ``at``, a time of the same clock)."""
        self.since = self._clock() if at is None else at

    def idle_s(self) -> float:
        """Seconds it has stood still."""
        return self._clock() - self.since

    def stalled(self) -> bool:
        """Whether it has stood still longer than the limit."""
        return self.idle_s() > self.limit_s
