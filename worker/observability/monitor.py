"""Beside the loop: asks the pipeline's read-only status about the coordinator, the database, lag and the outbox backlog."""

from __future__ import annotations

import asyncio
import time

import structlog

from worker.config import ObservabilitySettings
from worker.errors import BrokerError, PersistenceError
from worker.observability.health import HEALTH_CHECK_S, HEALTH_TIMEOUT_S
from worker.observability.metrics import Observer
from worker.pipeline.status import Status

log = structlog.get_logger("worker.observability")


class Monitor:
    """Beside the loop: every HEALTH_CHECK_S the coordinator and the database, every lag_interval_s lag and backlog."""

    def __init__(self, settings: ObservabilitySettings, status: Status, observer: Observer) -> None:
        self.settings = settings
        self.status = status
        self.observer = observer
        self.health = observer.health

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

    async def measure(self) -> None:
        """Lag per assigned partition (exported, and logged as consumer_lag) and the outbox backlog."""
        status = self.status
        bound = min(self.settings.lag_interval_s, HEALTH_TIMEOUT_S) + 1.0
        try:
            async with asyncio.timeout(bound):
                lag = await status.lag()
        except (BrokerError, TimeoutError) as exc:
            log.info("consumer_lag_unavailable", reason=str(exc) or f"no answer within {bound:g}s")
        else:
            self.observer.measured_lag(status.topic, lag)
            log.info("consumer_lag", total=sum(lag.values()), partitions={str(p): n for p, n in sorted(lag.items())})
        try:
            async with asyncio.timeout(bound):
                self.observer.metrics.outbox_backlog.set(await status.outbox_backlog())
        except (PersistenceError, TimeoutError) as exc:
            log.info("outbox_backlog_unavailable", reason=str(exc) or f"no answer within {bound:g}s")
