"""Retention of processed-event markers: delete those no redelivery can hit any more.

Every commit leaves a marker per (app, event) so that a redelivered or duplicated event is
recognised (``store.py``). Kept forever they grow without bound; a marker older than the
event topic's retention (plus a margin) can only be hit by a replay from further back than
the topic holds, which the operator chose. ``persistence.processed_retention_hours`` is
that window. A running worker prunes every ``persistence.prune_interval_s`` beside its loop
(:func:`pruning`, started by the runner); ``rc-worker db prune`` does the same once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from worker.config import PersistenceSettings
from worker.errors import PersistenceError
from worker.persistence.store import Store

log = structlog.get_logger("worker.persistence.retention")

# Markers deleted per transaction: each batch is short (milliseconds), so the commits of the
# worker's lanes, which queue behind it for SQLite's write lock, barely notice a long prune.
DEFAULT_BATCH = 5000


class PruneReport(Protocol):
    """Who hears how many markers a round removed (the pipeline's hooks do)."""

    def markers_pruned(self, count: int) -> None:
        """Retention deleted ``count`` processed-event markers."""


class _Unheard:
    def markers_pruned(self, count: int) -> None:
        pass


async def prune_processed(store: Store, older_than: datetime, batch: int = DEFAULT_BATCH) -> int:
    """Delete the markers processed before ``older_than``, ``batch`` per transaction; returns how many.

    Args:
        store: the database.
        older_than: a timezone-aware time; markers processed before it are deleted.
        batch: most markers deleted by one statement (one transaction).

    Raises:
        PersistenceError: the database failed; batches already committed stay deleted.
        ValueError: ``older_than`` is naive or ``batch`` below 1.

    """
    if older_than.tzinfo is None:
        raise ValueError("older_than must be timezone-aware (e.g. datetime.now(UTC) - timedelta(hours=168))")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, not {batch}")
    # SQLite keeps the UTC wall time without an offset (as the store writes it): compare in UTC.
    cutoff = older_than.astimezone(UTC)
    removed = 0
    while True:
        count = await store.delete_processed_before(cutoff, batch)
        removed += count
        # A short batch is the last: markers are written with the current time, so none older
        # than the cutoff appears meanwhile.
        if count < batch:
            return removed


def cutoff_for(hours: int, now: datetime | None = None) -> datetime:
    """The time before which markers are pruned under a retention of ``hours``."""
    return (now or datetime.now(UTC)) - timedelta(hours=hours)


# -- beside the worker's loop ------------------------------------------------------------


@contextlib.asynccontextmanager
async def pruning(store: Store, settings: PersistenceSettings, report: PruneReport | None = None) -> AsyncIterator[None]:
    """Prune expired markers every ``prune_interval_s`` while the block runs.

    Nothing runs when the retention or the interval is 0. The task is cancelled, and awaited,
    when the block ends, before the caller closes the store.
    """
    if settings.processed_retention_hours == 0 or settings.prune_interval_s == 0:
        yield
        return
    task = asyncio.create_task(
        _prune_every(store, settings.processed_retention_hours, settings.prune_interval_s, report or _Unheard()), name="processed-pruner"
    )
    try:
        yield
    finally:
        task.cancel()
        # wait() never raises the task's CancelledError into us, but still lets our own through.
        await asyncio.wait([task])


async def _prune_every(store: Store, retention_hours: int, interval_s: float, report: PruneReport) -> None:
    # The first round comes at a random point of the first interval, so workers started
    # together (a rollout) do not all prune at once.
    await asyncio.sleep(interval_s * random.uniform(0.1, 1.0))  # noqa: S311 - spreading, not cryptography
    while True:
        await prune_once(store, retention_hours, report)
        await asyncio.sleep(interval_s)


async def prune_once(store: Store, retention_hours: int, report: PruneReport | None = None) -> int | None:
    """One round of the worker's pruning: logged and counted; a failure is logged, never raised.

    Returns:
        The markers removed, or None when the round failed (the next round tries again).

    """
    cutoff = cutoff_for(retention_hours)
    started = time.perf_counter()
    try:
        removed = await prune_processed(store, cutoff)
    except Exception as exc:  # housekeeping never stops the worker; the next round retries
        log.warning(
            "processed_prune_failed",
            cutoff=cutoff.isoformat(),
            error_type=type(exc).__name__,
            reason=str(exc),
            # An outage needs no traceback; anything else is a bug, and it does.
            exc_info=not isinstance(exc, PersistenceError),
        )
        return None
    (report or _Unheard()).markers_pruned(removed)
    log.info(
        "processed_markers_pruned",
        count=removed,
        cutoff=cutoff.isoformat(),
        duration_ms=round((time.perf_counter() - started) * 1000, 1),
    )
    return removed
