"""What the pipeline reports as it runs, to whoever listens: a base class of no-op methods.

The stages (runner, lane, dispatcher) are handed a :class:`Hooks` and call it at each step,
as dramatiq calls its middleware: ``polled``, ``assigned``, ``batch_committed``, ``handler_failed``, ``dead_lettered``... The
observability package implements them (metrics, health); the pipeline never imports it.
:func:`contained` wraps a hooks object so that a failing hook is logged, never raised into
the stage that called it: observing must not stop processing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from worker.errors import VersionConflict

if TYPE_CHECKING:
    from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.pipeline.hooks")


class Hooks:
    """Every point the pipeline reports; each method does nothing here. Subclass and override."""

    def polled(self, batches: Mapping[int, Sequence[object]]) -> None:
        """A fetch returned ``batches`` (records by partition), about to be handed over."""

    def assigned(self, partitions: set[int]) -> None:
        """A rebalance gave this worker ``partitions`` (possibly none)."""

    def revoked(self, partitions: set[int]) -> None:
        """A rebalance began and took ``partitions`` away."""

    def batch_committed(self, result: BatchResult) -> None:
        """One partition's batch committed."""

    def conflict(self, exc: VersionConflict) -> None:
        """A batch's commit was refused: something it read had changed."""

    def handler_failed(self, app_id: str, exc: Exception, attempt: int, retrying: bool) -> None:
        """An app raised on its ``attempt``-th run of an event; ``retrying``: it runs again after a backoff."""

    def dead_lettered(self, app_id: str | None, count: int) -> None:
        """A commit made ``count`` dead letters durable.

        They are events ``app_id`` failed on every attempt, or (``app_id`` None) whole records,
        undecodable or conflicting on every attempt.
        """

    def markers_pruned(self, count: int) -> None:
        """Retention deleted ``count`` processed-event markers."""

    def database_round_trips(self, count: int) -> None:
        """The store sent ``count`` more statements (BEGIN and COMMIT included) to the database."""

    def commit(self) -> contextlib.AbstractContextManager[None]:
        """Around one unit of work's database commit (the exception, if any, passes through)."""
        return contextlib.nullcontext()

    def handler_runs(self, app_id: str, outcome: str, seconds: Sequence[float]) -> None:
        """Apps ran on events (``outcome`` ok or error), taking ``seconds`` each; reported in lots, not per run."""


class _Contained(Hooks):
    """Calls ``inner``'s plain hooks, logging instead of raising what they raise."""

    def __init__(self, inner: Hooks) -> None:
        self.inner = inner

    def _call(self, name: str, *args: Any) -> None:
        try:
            getattr(self.inner, name)(*args)
        except Exception:  # a broken observer must not stop a partition
            log.exception("hook_failed", hook=name)

    def polled(self, batches: Mapping[int, Sequence[object]]) -> None:
        self._call("polled", batches)

    def assigned(self, partitions: set[int]) -> None:
        self._call("assigned", partitions)

    def revoked(self, partitions: set[int]) -> None:
        self._call("revoked", partitions)

    def batch_committed(self, result: BatchResult) -> None:
        self._call("batch_committed", result)

    def conflict(self, exc: VersionConflict) -> None:
        self._call("conflict", exc)

    def handler_failed(self, app_id: str, exc: Exception, attempt: int, retrying: bool) -> None:
        self._call("handler_failed", app_id, exc, attempt, retrying)

    def dead_lettered(self, app_id: str | None, count: int) -> None:
        self._call("dead_lettered", app_id, count)

    def markers_pruned(self, count: int) -> None:
        self._call("markers_pruned", count)

    def database_round_trips(self, count: int) -> None:
        self._call("database_round_trips", count)

    def commit(self) -> contextlib.AbstractContextManager[None]:
        return self.inner.commit()

    def handler_runs(self, app_id: str, outcome: str, seconds: Sequence[float]) -> None:
        self._call("handler_runs", app_id, outcome, seconds)


def contained(hooks: Hooks | None) -> Hooks:
    """``hooks`` with failures of its plain methods logged, not raised; no-op hooks for None."""
    if hooks is None:
        return Hooks()
    return hooks if isinstance(hooks, _Contained) or type(hooks) is Hooks else _Contained(hooks)
