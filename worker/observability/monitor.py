"""Beside the loop: asks the pipeline's read-only status about the coordinator, the database, lag and the outbox backlog."""

from __future__ import annotations

import asyncio
import socket
import time
from datetime import UTC, datetime
from typing import Any

import structlog

from worker.config import ObservabilitySettings
from worker.errors import BrokerError, PersistenceError
from worker.observability.health import HEALTH_CHECK_S, HEALTH_TIMEOUT_S
from worker.observability.metrics import Observer
from worker.observability.throughput import Throughput
from worker.persistence.members import Member, heartbeat, leave
from worker.pipeline.status import Status

log = structlog.get_logger("worker.observability")

# How often a worker renews its row in worker_members (where the status pages find it).
MEMBER_HEARTBEAT_S = 5.0


class Monitor:
    """Beside the loop: every HEALTH_CHECK_S the coordinator and the database, every lag_interval_s lag and backlog."""

    def __init__(self, settings: ObservabilitySettings, status: Status, observer: Observer, url: str | None = None) -> None:
        self.settings = settings
        self.status = status
        self.observer = observer
        self.health = observer.health
        self.throughput = Throughput()
        self.url = url  # where this worker's endpoint answers, for its member row
        self._next_heartbeat = 0.0

    async def run(self) -> None:
        """Until the worker is asked to stop (or this task is cancelled)."""
        next_lag = time.monotonic()
        while not self.status.stopping():
            try:
                await self.check()
                if time.monotonic() >= next_lag:
                    next_lag = time.monotonic() + self.settings.lag_interval_s
                    await self.measure()
            except Exception:  # a dead monitor would freeze readiness: report it and go on
                log.exception("observability_monitor_failed")
            await asyncio.sleep(min(HEALTH_CHECK_S, self.settings.lag_interval_s))
        # Draining after SIGTERM: not ready any more, and the store is about to close.
        self.health.stopping = True
        await self._leave()

    async def check(self) -> None:
        """What readiness and liveness read: membership, the coordinator, the database, busy lanes."""
        status, health = self.status, self.health
        # The worker's clock is time.monotonic; so is the health's unless a test gives another.
        health.tick(status.busy_partitions(), health.now() - status.seconds_since_poll())
        health.coordinator_ok = status.in_group()
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await status.check_database()
        except (PersistenceError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {HEALTH_TIMEOUT_S:g}s"
            if health.database_ok is not False:
                log.warning("readiness_database_failed", reason=reason)
            health.database_ok, health.database_error = False, reason
        else:
            health.database_ok, health.database_error = True, ""
        # Taken here, on the event loop, and served from the HTTP thread: one assignment.
        health.report = self.report()
        if health.database_ok and time.monotonic() >= self._next_heartbeat:
            self._next_heartbeat = time.monotonic() + MEMBER_HEARTBEAT_S
            await self._heartbeat()

    def report(self) -> dict[str, Any]:
        """This member, its lanes and its per-app counters, for /status (the status pages)."""
        status, observer = self.status, self.observer
        return {
            "member": status.owner,
            "kafka_member_id": status.member_id(),
            "group": status.group_id,
            "topic": status.topic,
            "host": socket.gethostname(),
            "started_at": observer.started_at.isoformat(),
            "assigned_at": observer.assigned_at.isoformat() if observer.assigned_at else None,
            "partitions": [
                {
                    "partition": lane.partition,
                    "generation": lane.generation,
                    "paused": lane.paused,
                    "busy": lane.busy,
                    "retrying": lane.attempt > 0,
                    "attempt": lane.attempt,
                    "last_error": lane.last_error,
                    "last_error_at": datetime.fromtimestamp(lane.last_error_at, UTC).isoformat() if lane.last_error_at else None,
                    "seconds_since_progress": lane.seconds_since_progress,
                }
                for lane in status.lanes()
            ],
            "apps": observer.per_app(),
        }

    async def _heartbeat(self) -> None:
        status = self.status
        row = Member(
            status.owner,
            status.group_id,
            status.topic,
            socket.gethostname(),
            status.member_id(),
            self.url,
            self.observer.started_at,
            datetime.now(UTC),
        )
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await heartbeat(status.store, row)
        except (PersistenceError, TimeoutError) as exc:
            log.info("member_heartbeat_failed", reason=str(exc) or f"no answer within {HEALTH_TIMEOUT_S:g}s")

    async def _leave(self) -> None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await leave(self.status.store, self.status.owner)
        except (PersistenceError, TimeoutError) as exc:
            log.info("member_leave_failed", reason=str(exc) or f"no answer within {HEALTH_TIMEOUT_S:g}s")

    async def measure(self) -> None:
        """Lag per assigned partition (exported, and logged as consumer_lag), the outbox backlog, and the throughput line.

        ``throughput`` is the line to read: this worker's events/s, lag and conflicts since its
        last one; the per-batch ``batch_committed`` lines are at debug level.
        """
        status = self.status
        bound = min(self.settings.lag_interval_s, HEALTH_TIMEOUT_S) + 1.0
        total: int | None = None
        try:
            async with asyncio.timeout(bound):
                lag = await status.lag()
        except (BrokerError, TimeoutError) as exc:
            log.info("consumer_lag_unavailable", reason=str(exc) or f"no answer within {bound:g}s")
        else:
            self.observer.measured_lag(status.topic, lag)
            total = sum(lag.values())
            log.info("consumer_lag", total=total, partitions={str(p): n for p, n in sorted(lag.items())})
        log.info("throughput", **self.throughput.line(self.observer.tally, total, len(self.observer.partitions)))
        try:
            async with asyncio.timeout(bound):
                self.observer.metrics.outbox_backlog.set(await status.outbox_backlog())
        except (PersistenceError, TimeoutError) as exc:
            log.info("outbox_backlog_unavailable", reason=str(exc) or f"no answer within {bound:g}s")
