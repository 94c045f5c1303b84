"""One unit of work for the batches a worker's lanes hand in together: no conflicts among its own partitions.

Every lane of a worker used to run its batch as a unit of its own, concurrently: two lanes
that both write a key every event touches (message-count's global counter) then conflicted
with each other on nearly every batch, and ran their handlers again, locked. Here the lanes
take turns: whoever's turn it is runs every batch waiting at that moment as one unit, on one
snapshot shared by the worker's partitions, and commits it once with each partition's next
offset under its own fence. A partition whose handler must back off leaves the shared unit
from that event on (what went before it commits) and is dispatched on its own, as is every
partition of a unit that failed (fenced, the database down, conflicts without end): those
paths are exactly a lone lane's, so a partition that waits still holds up no other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from worker.errors import WorkerError
from worker.events import RawRecord
from worker.persistence.keys import Key
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Fence
from worker.pipeline.apprun import HandlerFailures
from worker.pipeline.dispatch import Dispatcher, Part
from worker.pipeline.retry import backoff
from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.combine")

# Shared units in a row without a conflict after which the hot keys are no longer locked first.
CALM_UNITS = 20


@dataclass(slots=True)
class _Request:
    part: Part
    future: asyncio.Future[BatchResult | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    backoff: bool = False  # it left the shared unit because a handler must wait


class Combiner:
    """Runs the batches of a worker's partitions, handed in at about the same time, as one unit of work."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.snapshot = Snapshot()  # what the worker's last shared unit left in the database
        # Keys other workers keep changing, locked before a shared unit runs (see
        # Dispatcher.dispatch_together); forgotten after CALM_UNITS units without a conflict.
        self.hot: set[Key] = set()
        self._calm = 0
        self._waiting: list[_Request] = []
        self._turn = asyncio.Lock()

    async def dispatch(self, records: Sequence[RawRecord], fence: Fence | None, *, snapshot: Snapshot, locked: bool = False) -> BatchResult:
        """Process one partition's batch with whatever others wait now; as ``Dispatcher.dispatch``.

        ``snapshot`` and ``locked`` are the partition's own, for when it runs alone.
        """
        request = _Request(Part(records, fence))
        self._waiting.append(request)
        # One step of the loop before taking the turn: the lanes one fetch woke (a replay's
        # tasks, created together) hand theirs in first. Without it, the first to run found
        # the turn free and ran its batch alone, and the rest waited to run as a second unit.
        await asyncio.sleep(0)
        async with self._turn:
            if not request.future.done():
                taken, self._waiting = self._waiting, []
                await self._run(taken)
        done = request.future.result()
        rest = request.part.rest if done is not None else records
        if not rest and done is not None:
            return done
        if request.backoff:
            await asyncio.sleep(backoff(1, self.dispatcher.settings))
        result = await self.dispatcher.dispatch(rest, fence, locked=locked, snapshot=snapshot, failures=request.part.failures)
        if done is None:
            return result
        done.add(result)  # what went through in the shared unit, then the rest alone
        done.next_offset = result.next_offset
        return done

    async def _run(self, taken: list[_Request]) -> None:
        results: dict[int, BatchResult] = {}
        try:
            results = await self.dispatcher.dispatch_together([r.part for r in taken], self.snapshot, self.hot)
            self._calm = 0 if any(r.conflicts for r in results.values()) else self._calm + 1
            if self._calm >= CALM_UNITS:
                self.hot.clear()
        except WorkerError as exc:
            # Fenced, the database failing, conflicts without end: each partition finds out
            # alone (and waits alone), as a lane does.
            self.snapshot.clear()
            log.info("shared_unit_failed", partitions=len(taken), error_type=type(exc).__name__, reason=str(exc))
        finally:
            # Also when cancelled or failing on a bug: whoever is not done runs alone.
            for index, request in enumerate(taken):
                if not request.future.done():
                    result = results.get(index)
                    request.backoff = any(request.part.failures.runs.values()) and (result is None or bool(request.part.rest))
                    request.future.set_result(result)


__all__ = ["Combiner", "HandlerFailures"]
