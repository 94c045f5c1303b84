"""Liveness and readiness, judged from what the pipeline reports and what the monitor measures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from worker.pipeline.stall import Stall

log = structlog.get_logger("worker.observability")


# How often the monitor asks the group coordinator and the database whether they answer,
# and how long one such question may take: readiness is at most this stale.
HEALTH_CHECK_S = 2.0


HEALTH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer of a probe: whether it passes, and why, as the JSON body says."""

    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


class Health:
    """Liveness and readiness, judged from what the loop reports.

    Written from the event loop, read from the HTTP thread; every field is one atomic
    assignment, so no lock is needed.

    Liveness fails when the event loop stops running (the monitor stops ticking), when
    fetching stops while the group coordinator answers, or when batches wait with no
    progress anywhere (no handler run, commit or retry) while the database answers, each for
    longer than ``stall_s``. A worker with nothing to do, or one waiting for a broker or a
    database that is down, is alive: restarting it would not help, and readiness says why.
    """

    def __init__(self, stall_s: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.loop = Stall(stall_s, clock)  # the monitor's rounds: the event loop runs
        self.fetching = Stall(stall_s, clock)  # the fetch loop's successful fetches
        self.processing = Stall(stall_s, clock)  # records handed over, a handler run, a commit or a retry
        self.busy = 0  # partitions with a batch in flight
        self.member = False  # holds an assignment (possibly empty) since the last rebalance
        self.coordinator_ok = False
        self.database_ok: bool | None = None  # None until first asked
        self.database_error = ""
        self.stopping = False
        self.report: dict[str, Any] = {}  # what /status answers besides the verdicts; replaced whole by the monitor

    @property
    def stall_s(self) -> float:
        """Seconds without movement that fail liveness."""
        return self.loop.limit_s

    @stall_s.setter
    def stall_s(self, seconds: float) -> None:
        for stall in (self.loop, self.fetching, self.processing):
            stall.limit_s = seconds

    def now(self) -> float:
        """The clock this health is judged by."""
        return self._clock()

    def progress(self) -> None:
        """Processing moved: records handed over, a handler ran, a commit finished, a retry began."""
        self.processing.moved()

    def tick(self, busy: int, last_poll: float) -> None:
        """The monitor's round: the loop runs, ``busy`` partitions have a batch, the last fetch was at ``last_poll``."""
        self.loop.moved()
        self.busy = busy
        self.fetching.moved(at=last_poll)

    def liveness(self) -> Verdict:
        """Passes unless the loop, the fetching or the processing has stalled for ``stall_s``."""
        loop_s, poll_s, progress_s = (round(stall.idle_s(), 3) for stall in (self.loop, self.fetching, self.processing))
        detail: dict[str, Any] = {
            "seconds_since_loop_ran": loop_s,
            "seconds_since_fetch": poll_s,
            "seconds_since_progress": progress_s,
            "busy_partitions": self.busy,
            "stall_s": self.stall_s,
        }
        reasons = []
        if self.loop.stalled():
            reasons.append(f"the event loop has not run for {loop_s:.0f}s (blocked by synchronous code?)")
        if self.fetching.stalled() and self.coordinator_ok:
            reasons.append(f"no fetch for {poll_s:.0f}s although the broker answers")
        if self.busy and self.processing.stalled() and self.database_ok is not False:
            reasons.append(f"{self.busy} partition(s) have a batch in flight and nothing progressed for {progress_s:.0f}s")
        if reasons:
            detail["reason"] = "; ".join(reasons)
        return Verdict(not reasons, detail)

    def readiness(self) -> Verdict:
        """Passes while the worker is a group member, reaches the coordinator, and the database answers."""
        reasons = []
        if self.stopping:
            reasons.append("stopping")
        if not self.member:
            reasons.append("not a member of the consumer group (joining or rebalancing)")
        elif not self.coordinator_ok:
            reasons.append("the group coordinator cannot be reached")
        if self.database_ok is None:
            reasons.append("the database has not been checked yet")
        elif not self.database_ok:
            reasons.append(f"the database does not answer: {self.database_error}")
        detail: dict[str, Any] = {"group_member": self.member, "coordinator": self.coordinator_ok, "database": self.database_ok}
        if reasons:
            detail["reason"] = "; ".join(reasons)
        return Verdict(not reasons, detail)
