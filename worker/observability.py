"""What an operator sees of one worker: Prometheus metrics, liveness, readiness and lag.

The runner and the dispatcher report what happens through :data:`observe` in one-line
calls; prometheus-client counts it in :data:`REGISTRY`. ``rc-worker run`` wraps the loop in
:func:`serve`, which starts a small HTTP server in a thread (/metrics, /healthz, /readyz)
and a monitor task beside the loop that measures consumer lag, the outbox backlog, and
whether the group coordinator and the database answer. The server runs in a thread so that
/healthz still answers, and says so, when the event loop itself is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

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
from prometheus_client.exposition import MetricsHandler

from worker import tracing
from worker.config import ObservabilitySettings
from worker.errors import BrokerError, FencedError, PersistenceError, VersionConflict
from worker.observability_asgi import Addressed, AsgiEndpoint, cannot_listen

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from worker.dispatch import BatchResult
    from worker.runner import Worker

log = structlog.get_logger("worker.observability")

# The *_created series double every counter and histogram and no alert or dashboard here uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus-client leaves it unannotated

# How often the monitor asks the group coordinator and the database whether they answer,
# and how long one such question may take: readiness is at most this stale.
HEALTH_CHECK_S = 2.0
HEALTH_TIMEOUT_S = 5.0
# How often a worker renews its row in worker_members (where the status pages find it).
MEMBER_HEARTBEAT_S = 5.0
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
            "Events an app failed on every attempt, sent to the dead-letter topic.",
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
        self.live = Gauge("rc_worker_live", "1 while /healthz passes.", registry=registry)
        self.ready = Gauge("rc_worker_ready", "1 while /readyz passes.", registry=registry)
        self.info = Info("rc_worker", "The worker's version, group and topic.", registry=registry)


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


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
        self.stall_s = stall_s
        self._clock = clock
        now = clock()
        self.last_tick = now  # the monitor's last round: the event loop runs
        self.last_poll = now  # the fetch loop's last successful fetch
        self.last_progress = now  # records handed over, a handler run, a commit or a retry
        self.busy = 0  # partitions with a batch in flight
        self.member = False  # holds an assignment (possibly empty) since the last rebalance
        self.coordinator_ok = False
        self.database_ok: bool | None = None  # None until first asked
        self.database_error = ""
        self.stopping = False
        self.report: dict[str, Any] = {}  # what /status answers besides the verdicts; replaced whole by the monitor

    def now(self) -> float:
        """The clock this health is judged by."""
        return self._clock()

    def progress(self) -> None:
        """Processing moved: records handed over, a handler ran, a commit finished, a retry began."""
        self.last_progress = self._clock()

    def tick(self, busy: int, last_poll: float) -> None:
        """The monitor's round: the loop runs, ``busy`` partitions have a batch, the last fetch was at ``last_poll``."""
        self.last_tick = self._clock()
        self.busy = busy
        self.last_poll = last_poll

    def liveness(self) -> Verdict:
        """Passes unless the loop, the fetching or the processing has stalled for ``stall_s``."""
        now = self._clock()
        loop_s, poll_s, progress_s = (round(now - t, 3) for t in (self.last_tick, self.last_poll, self.last_progress))
        detail: dict[str, Any] = {
            "seconds_since_loop_ran": loop_s,
            "seconds_since_fetch": poll_s,
            "seconds_since_progress": progress_s,
            "busy_partitions": self.busy,
            "stall_s": self.stall_s,
        }
        reasons = []
        if loop_s > self.stall_s:
            reasons.append(f"the event loop has not run for {loop_s:.0f}s (blocked by synchronous code?)")
        if poll_s > self.stall_s and self.coordinator_ok:
            reasons.append(f"no fetch for {poll_s:.0f}s although the broker answers")
        if self.busy and progress_s > self.stall_s and self.database_ok is not False:
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


class Observer:
    """Where the runner and the dispatcher report; updates :class:`Metrics` and :class:`Health`."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
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
            self.metrics.consumed.inc(sum(len(records) for records in batches.values()))
            self.health.progress()

    def batch_committed(self, result: BatchResult) -> None:
        """One partition's batch committed: count what it did, per app."""
        counters = {
            "processed": self.metrics.processed,
            "skipped": self.metrics.skipped,
            "duplicate": self.metrics.duplicates,
            "dead_lettered": self.metrics.dead_lettered,
        }
        for (app_id, outcome), count in result.outcomes.items():
            counters[outcome].labels(app_id).inc(count)
        self.metrics.records_dead_lettered.inc(result.dead_lettered)
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

    @contextlib.asynccontextmanager
    async def handler(self, app_id: str) -> AsyncIterator[None]:
        """Time one app's run on one event, inside its tracing span."""
        started = time.perf_counter()
        outcome = "error"
        try:
            with tracing.span("rc_worker.handler", app=app_id):
                yield
            outcome = "ok"
        finally:
            self.metrics.handler_seconds.labels(app_id, outcome).observe(time.perf_counter() - started)
            self.health.progress()

    def handler_retried(self, app_id: str) -> None:
        """An app raised and runs again after a backoff."""
        self.metrics.retries.labels(app_id).inc()
        self.health.progress()

    def markers_pruned(self, count: int) -> None:
        """Retention deleted ``count`` processed-event markers."""
        self.metrics.markers_pruned.inc(count)

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
        """Export the lag just measured, per partition."""
        for partition, records in lag.items():
            series = (topic, str(partition))
            self.metrics.lag.labels(*series).set(records)
            self._lag_series.add(series)


REGISTRY = _registry()
"""The registry /metrics serves: the worker's metrics and the process collectors."""

observe = Observer(Metrics(REGISTRY), Health())
"""The process's observer: the runner and the dispatcher report here."""


# -- the HTTP endpoint ------------------------------------------------------------------------


class Endpoint(Addressed):
    """The HTTP server for /metrics, /healthz and /readyz, answering from its own thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        handler = type("Handler", (_Handler,), {"registry": registry, "health": health})
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), handler)
        except OSError as exc:
            raise cannot_listen(host, port, exc) from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="rc-worker-http")
        self._thread.daemon = True  # never keeps the process alive on its own
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(MetricsHandler):
    """prometheus-client's exposition at /metrics, JSON verdicts at /healthz and /readyz."""

    health: Health

    def do_GET(self) -> None:
        """Route one GET request."""
        path = urlparse(self.path).path
        if path == "/metrics":
            super().do_GET()
            return
        self._reply(*probe(self.health, path))

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


PROBE_PATHS = ("/metrics", "/healthz", "/readyz", "/status")


def probe(health: Health, path: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a probe path: /healthz (or /livez), /readyz, /status; 404 otherwise."""
    if path == "/status":
        return 200, status_document(health)
    if path in ("/healthz", "/livez"):
        verdict = health.liveness()
    elif path == "/readyz":
        verdict = health.readiness()
    else:
        return 404, {"error": "not found", "paths": list(PROBE_PATHS)}
    return (200 if verdict.ok else 503), {"status": "ok" if verdict.ok else "fail", **verdict.detail}


def status_document(health: Health) -> dict[str, Any]:
    """What /status answers: the monitor's last report (member, lanes, per-app counters) and both verdicts now."""
    liveness, readiness = health.liveness(), health.readiness()
    return {
        **health.report,
        "liveness": {"ok": liveness.ok, "detail": liveness.detail},
        "readiness": {"ok": readiness.ok, "detail": readiness.detail},
    }


# -- serving beside the loop ------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(
    settings: ObservabilitySettings, worker: Worker, observer: Observer = observe, pages: Callable[[], ASGIApp] | None = None
) -> AsyncIterator[Endpoint | AsgiEndpoint | None]:
    """Serve the endpoint (when enabled; with ``pages`` when ``web`` is on) and run the monitor beside ``worker`` for the block.

    Raises:
        ConfigError: the port cannot be bound, or tracing is on without OpenTelemetry.

    """
    observer.health.stall_s = settings.liveness_stall_s
    observer.metrics.info.info({"version": _version(), "group": worker.consumer.group_id, "topic": worker.consumer.topic})
    tracing.configure(settings.tracing)
    endpoint: Endpoint | AsgiEndpoint | None = None
    if settings.enabled and settings.web and pages is not None:
        endpoint = AsgiEndpoint(settings.host, settings.port, observer.metrics.registry, lambda path: probe(observer.health, path), pages)
    elif settings.enabled:
        endpoint = Endpoint(settings.host, settings.port, observer.metrics.registry, observer.health)
    if endpoint is not None:
        log.info(
            "observability_listening", host=endpoint.host, port=endpoint.port, url=endpoint.url, web=isinstance(endpoint, AsgiEndpoint)
        )
    url = endpoint.advertised_url if endpoint is not None else None
    monitor = asyncio.create_task(Monitor(settings, worker, observer, url).run(), name="observability-monitor")
    try:
        yield endpoint
    finally:
        observer.health.stopping = True
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        if endpoint is not None:
            await asyncio.to_thread(endpoint.close)
        tracing.shutdown()


class Monitor:
    """Beside the loop: every HEALTH_CHECK_S the coordinator and the database, every lag_interval_s lag and backlog."""

    def __init__(self, settings: ObservabilitySettings, worker: Worker, observer: Observer, url: str | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.observer = observer
        self.health = observer.health
        self.url = url
        self._next_heartbeat = 0.0

    async def run(self) -> None:
        """Until the worker is asked to stop (or this task is cancelled)."""
        next_lag = time.monotonic()
        while not self.worker.stopping.is_set():
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
        worker, health = self.worker, self.health
        busy = sum(1 for lane in list(worker.lanes.values()) if lane.busy)
        # The worker's clock is time.monotonic; so is the health's unless a test gives another.
        health.tick(busy, health.now() - (time.monotonic() - worker.last_poll))
        health.coordinator_ok = worker.consumer.in_group()
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await worker.store.stored_offsets(worker.consumer.group_id, worker.consumer.topic)
        except (PersistenceError, TimeoutError) as exc:
            reason = str(exc) or f"no answer within {HEALTH_TIMEOUT_S:g}s"
            if health.database_ok is not False:
                log.warning("readiness_database_failed", reason=reason)
            health.database_ok, health.database_error = False, reason
        else:
            health.database_ok, health.database_error = True, ""
        health.report = self.report()
        if health.database_ok and time.monotonic() >= self._next_heartbeat:
            self._next_heartbeat = time.monotonic() + MEMBER_HEARTBEAT_S
            await self._heartbeat()

    def report(self) -> dict[str, Any]:
        """This member, its lanes and its per-app counters, for /status (the status pages)."""
        worker, observer = self.worker, self.observer
        lanes = sorted(worker.lanes.values(), key=lambda lane: lane.partition)
        return {
            "member": worker.owner,
            "kafka_member_id": worker.consumer.member_id(),
            "group": worker.consumer.group_id,
            "topic": worker.consumer.topic,
            "host": socket.gethostname(),
            "started_at": observer.started_at.isoformat(),
            "assigned_at": observer.assigned_at.isoformat() if observer.assigned_at else None,
            "partitions": [
                {
                    "partition": lane.partition,
                    "generation": lane.fence.generation,
                    "paused": lane.busy,  # the runner pauses a partition in Kafka while its lane has a batch
                    "retrying": lane.attempt > 0,
                    "attempt": lane.attempt,
                    "last_error": lane.last_error,
                    "last_error_at": datetime.fromtimestamp(lane.last_error_at, UTC).isoformat() if lane.last_error_at else None,
                }
                for lane in lanes
            ],
            "apps": observer.per_app(),
        }

    async def _heartbeat(self) -> None:
        from worker.persistence.members import Member, heartbeat

        worker = self.worker
        row = Member(
            worker.owner,
            worker.consumer.group_id,
            worker.consumer.topic,
            socket.gethostname(),
            worker.consumer.member_id(),
            self.url,
            self.observer.started_at,
            datetime.now(UTC),
        )
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await heartbeat(worker.store, row)
        except (PersistenceError, TimeoutError) as exc:
            log.info("member_heartbeat_failed", reason=str(exc) or f"no answer within {HEALTH_TIMEOUT_S:g}s")

    async def _leave(self) -> None:
        from worker.persistence.members import leave

        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                await leave(self.worker.store, self.worker.owner)
        except (PersistenceError, TimeoutError) as exc:
            log.info("member_leave_failed", reason=str(exc) or f"no answer within {HEALTH_TIMEOUT_S:g}s")

    async def measure(self) -> None:
        """Lag per assigned partition (exported, and logged as consumer_lag) and the outbox backlog."""
        consumer, store = self.worker.consumer, self.worker.store
        bound = min(self.settings.lag_interval_s, HEALTH_TIMEOUT_S) + 1.0
        try:
            async with asyncio.timeout(bound):
                lag = await consumer.lag()
        except (BrokerError, TimeoutError) as exc:
            log.info("consumer_lag_unavailable", reason=str(exc) or f"no answer within {bound:g}s")
        else:
            self.observer.measured_lag(consumer.topic, lag)
            log.info("consumer_lag", total=sum(lag.values()), partitions={str(p): n for p, n in sorted(lag.items())})
        try:
            async with asyncio.timeout(bound):
                self.observer.metrics.outbox_backlog.set(await store.outbox_backlog())
        except (PersistenceError, TimeoutError) as exc:
            log.info("outbox_backlog_unavailable", reason=str(exc) or f"no answer within {bound:g}s")


def _version() -> str:
    try:
        return version("rc-apps-worker")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"
