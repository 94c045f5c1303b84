"""The worker's Prometheus metrics, and the Observer: the pipeline's hooks counted into them and into health."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import structlog
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from worker.errors import FencedError, VersionConflict
from worker.pipeline.hooks import Hooks

if TYPE_CHECKING:
    from worker.pipeline.tally import BatchResult
from worker.observability.health import Health
from worker.observability.throughput import Tally

log = structlog.get_logger("worker.observability")


# The *_created series double every counter and histogram and no alert or dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated


# Seconds buckets for handler runs and commits: 1 ms (an in-memory counter) to 30 s (the
# default handler timeout).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


UNKNOWN_APP = "unknown"


class Metrics:
    """The worker's Prometheus metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        app = ("app",)
        self.consumed = Counter("rc_worker_records_consumed", "Records fetched from the event topic.", registry=registry)
        self.records_dead_lettered = Counter(
            "rc_worker_records_dead_lettered",
            "Records sent to the dead-letter topic whole: not a contract event, or conflicting on every attempt.",
            registry=registry,
        )
        self.processed = Counter("rc_worker_events_processed", "Events an app ran on, committed.", app, registry=registry)
        self.skipped = Counter(
            "rc_worker_events_skipped", "Events of a type the apps do not handle (counted for every app).", app, registry=registry
        )
        self.duplicates = Counter(
            "rc_worker_events_duplicate", "Events an app had already processed (redeliveries, publisher retries).", app, registry=registry
        )
        self.dead_lettered = Counter(
            "rc_worker_events_dead_lettered",
            "Events an app failed on every attempt, or whose writes the database refused, sent to the dead-letter topic.",
            app,
            registry=registry,
        )
        self.conflicts = Counter(
            "rc_worker_version_conflicts",
            "Commits refused because something read had changed (the app of the changed key); the batch runs again.",
            app,
            registry=registry,
        )
        self.retries = Counter("rc_worker_handler_retries", "Handler runs that raised and are tried again.", app, registry=registry)
        self.handler_seconds = Histogram(
            "rc_worker_handler_duration_seconds",
            "One app's run on one event; outcome ok or error.",
            ("app", "outcome"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "rc_worker_commit_duration_seconds",
            "One unit of work's database commit; outcome committed, conflict, fenced or error.",
            ("outcome",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.lag = Gauge(
            "rc_worker_consumer_lag", "Records between this worker's position and the log end.", ("topic", "partition"), registry=registry
        )
        self.assigned = Gauge("rc_worker_assigned_partitions", "Partitions of the event topic this worker holds.", registry=registry)
        self.rebalances = Counter("rc_worker_rebalances", "Partition assignments received (one per rebalance).", registry=registry)
        self.outbox_backlog = Gauge(
            "rc_worker_outbox_backlog", "Outbox rows (commands, dead letters) committed but not yet published.", registry=registry
        )
        self.markers_pruned = Counter(
            "rc_worker_processed_markers_pruned", "Processed-event markers deleted by retention.", registry=registry
        )
        self.round_trips = Counter(
            "rc_worker_db_round_trips", "Statements sent to the database, BEGIN and COMMIT included: its round trips.", registry=registry
        )
        self.live = Gauge("rc_worker_live", "1 while /healthz passes.", registry=registry)
        self.ready = Gauge("rc_worker_ready", "1 while /readyz passes.", registry=registry)
        self.info = Info("rc_worker", "The worker's version, group and topic.", registry=registry)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class Observer(Hooks):
    """Where the runner and the dispatcher report; updates :class:`Metrics`, :class:`Health` and the :class:`Tally`."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self.tally = Tally()
        self.partitions: set[int] = set()
        self.started_at = datetime.now(UTC)
        self.assigned_at: datetime | None = None  # the last rebalance that gave this worker its partitions
        self._lag_series: set[tuple[str, str]] = set()
        metrics.live.set_function(lambda: float(health.liveness().ok))
        metrics.ready.set_function(lambda: float(health.readiness().ok))

    # -- the runner -------------------------------------------------------------------------

    def polled(self, batches: Mapping[int, Sequence[object]]) -> None:
        """A fetch returned ``batches`` (records by partition), about to be handed over."""
        if batches:
            count = sum(len(records) for records in batches.values())
            self.metrics.consumed.inc(count)
            self.tally.records += count
            self.health.progress()

    def batch_committed(self, result: BatchResult) -> None:
        """One partition's batch committed: count what it did, per app."""
        counters = {"processed": self.metrics.processed, "skipped": self.metrics.skipped, "duplicate": self.metrics.duplicates}
        for (app_id, outcome), count in result.outcomes.items():
            if outcome in counters:  # dead letters are counted by dead_lettered, as their commit succeeds
                counters[outcome].labels(app_id).inc(count)
        tally = self.tally
        tally.events += result.processed
        tally.duplicates += result.duplicates
        tally.dead_letters += result.dead_letters
        tally.conflicts += result.conflicts
        self.health.progress()

    def assigned(self, partitions: set[int]) -> None:
        """A rebalance gave this worker ``partitions`` (possibly none): it is a member again."""
        self.partitions |= partitions
        self.metrics.assigned.set(len(self.partitions))
        self.metrics.rebalances.inc()
        self.health.member = True
        self.assigned_at = datetime.now(UTC)

    def revoked(self, partitions: set[int]) -> None:
        """A rebalance began and took ``partitions`` away."""
        self.partitions -= partitions
        self.metrics.assigned.set(len(self.partitions))
        self.health.member = False
        for series in [s for s in self._lag_series if int(s[1]) in partitions]:
            self.metrics.lag.remove(*series)
            self._lag_series.discard(series)

    # -- the dispatcher ---------------------------------------------------------------------

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        """Time a unit of work's database commit."""
        started = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "committed"
        except VersionConflict:
            outcome = "conflict"
            raise
        except FencedError:
            outcome = "fenced"
            raise
        finally:
            self.metrics.commit_seconds.labels(outcome).observe(time.perf_counter() - started)
            self.health.progress()

    def conflict(self, exc: VersionConflict) -> None:
        """A batch conflicted: count it once against each app whose keys had changed."""
        for app_id in sorted({app for app, _ in exc.keys}) if exc.keys else [UNKNOWN_APP]:
            self.metrics.conflicts.labels(app_id).inc()

    def handler_runs(self, app_id: str, outcome: str, seconds: Sequence[float]) -> None:
        """Time apps' runs on events, reported in lots by the dispatcher."""
        durations = self.metrics.handler_seconds.labels(app_id, outcome)
        for value in seconds:
            durations.observe(value)
        self.health.progress()

    def handler_failed(self, app_id: str, exc: Exception, attempt: int, retrying: bool) -> None:
        """An app raised: a retry is counted when it runs again."""
        if retrying:
            self.metrics.retries.labels(app_id).inc()
            self.health.progress()

    def dead_lettered(self, app_id: str | None, count: int) -> None:
        """Dead letters committed: events an app failed for good, or (no app) whole records."""
        if app_id is None:
            self.metrics.records_dead_lettered.inc(count)
        else:
            self.metrics.dead_lettered.labels(app_id).inc(count)

    def markers_pruned(self, count: int) -> None:
        """Retention deleted ``count`` processed-event markers."""
        self.metrics.markers_pruned.inc(count)

    def database_round_trips(self, count: int) -> None:
        """Count the store's statements."""
        self.metrics.round_trips.inc(count)

    # -- the monitor ------------------------------------------------------------------------

    def per_app(self) -> dict[str, dict[str, int]]:
        """The per-app counters since this process started: processed, conflicts, retries, dead-lettered."""
        counters = {
            "processed": self.metrics.processed,
            "conflicts": self.metrics.conflicts,
            "retries": self.metrics.retries,
            "dead_lettered": self.metrics.dead_lettered,
        }
        totals: dict[str, dict[str, int]] = {}
        for name, counter in counters.items():
            for family in counter.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        totals.setdefault(sample.labels["app"], dict.fromkeys(counters, 0))[name] = int(sample.value)
        return totals

    def measured_lag(self, topic: str, lag: Mapping[int, int]) -> None:
        """Export the lag just measured, per partition this worker still holds.

        A measurement awaits the broker, so a rebalance can revoke partitions while it runs:
        exporting those would leave series that no later revoke removes, and the group's lag
        would show partitions twice.
        """
        for partition, records in lag.items():
            if partition not in self.partitions:
                continue
            series = (topic, str(partition))
            self.metrics.lag.labels(*series).set(records)
            self._lag_series.add(series)


REGISTRY = _registry()


"""The registry /metrics serves: the worker's metrics and the process collectors."""


observe = Observer(Metrics(REGISTRY), Health())


"""The process's observer: the runner and the dispatcher report here."""
