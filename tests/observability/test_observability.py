"""Metrics, liveness, readiness and tracing: the pure judgement first, then real workers.

The end-to-end tests run `rc-worker run` processes against the real broker and a real
PostgreSQL and read them only over HTTP, as Prometheus and the kubelet would. The outage
test starts a broker of its own on port 19092 and never touches the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from tests.support import FIXTURES, ROOT, StartWorker, TopicSet, WorkerProcess, make_events, rc_worker, store_for, wait_until
from worker import tracing
from worker.apps.http import Http
from worker.config import ProcessingSettings, Settings
from worker.errors import ConfigError, VersionConflict
from worker.events import RawRecord
from worker.kafka import create_topics
from worker.observability import Endpoint, Health, Metrics, Observer, serve
from worker.observability.throughput import Throughput
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.pipeline.runner import Worker
from worker.pipeline.tally import BatchResult
from worker.plugins import load_apps
from worker.tools.dump import read_records_file

# -- pure: liveness and readiness ---------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> Health:
    """A worker's health, 60 s stall limit, in the state of a running member."""
    checked = Health(stall_s=60, clock=clock)
    checked.member = checked.coordinator_ok = checked.database_ok = True
    return checked


def advance(clock: FakeClock, health: Health, seconds: float, *, busy: int) -> None:
    """Let ``seconds`` pass with the loop ticking and fetching, ``busy`` partitions in flight."""
    clock.now += seconds
    health.tick(busy, last_poll=clock.now)


class TestLiveness:
    def test_idle_worker_stays_live_however_long_nothing_arrives(self, clock: FakeClock, health: Health) -> None:
        """With nothing in flight, no progress for hours is not a stall."""
        advance(clock, health, 7200, busy=0)
        assert health.liveness().ok

    def test_batches_without_progress_fail_after_the_stall_limit(self, clock: FakeClock, health: Health) -> None:
        """A batch in flight with nothing progressing for longer than stall_s fails liveness."""
        advance(clock, health, 59, busy=2)
        assert health.liveness().ok
        advance(clock, health, 2, busy=2)
        verdict = health.liveness()
        assert not verdict.ok
        assert "2 partition(s) have a batch in flight" in verdict.detail["reason"]

    def test_progress_keeps_a_long_busy_worker_live(self, clock: FakeClock, health: Health) -> None:
        """Handler runs and commits every few seconds keep a worker live through a long batch."""
        for _ in range(100):
            advance(clock, health, 5, busy=1)
            health.progress()
        assert health.liveness().ok

    def test_a_database_outage_does_not_fail_liveness(self, clock: FakeClock, health: Health) -> None:
        """Batches waiting for a database that does not answer are waiting, not stalled."""
        health.database_ok = False
        advance(clock, health, 600, busy=3)
        assert health.liveness().ok
        assert not health.readiness().ok

    def test_a_blocked_event_loop_fails_liveness(self, clock: FakeClock, health: Health) -> None:
        """When the monitor stops ticking, the event loop is blocked, whatever the last state said."""
        clock.now += 61
        verdict = health.liveness()
        assert not verdict.ok
        assert "event loop" in verdict.detail["reason"]

    def test_stopped_fetching_fails_only_while_the_broker_answers(self, clock: FakeClock, health: Health) -> None:
        """No fetch for stall_s is a stall, unless the coordinator is unreachable (a broker outage)."""
        last_poll = clock.now
        clock.now += 61
        health.tick(0, last_poll=last_poll)
        assert "no fetch" in health.liveness().detail["reason"]
        health.coordinator_ok = False
        assert health.liveness().ok


class TestReadiness:
    def test_ready_as_a_member_that_reaches_coordinator_and_database(self, health: Health) -> None:
        """All three conditions hold: ready."""
        assert health.readiness().ok

    @pytest.mark.parametrize(
        ("field", "value", "reason"),
        [
            ("member", False, "not a member of the consumer group"),
            ("coordinator_ok", False, "coordinator cannot be reached"),
            ("database_ok", False, "database does not answer"),
            ("database_ok", None, "database has not been checked"),
            ("stopping", True, "stopping"),
        ],
    )
    def test_each_missing_condition_makes_it_unready_and_says_why(self, health: Health, field: str, value: Any, reason: str) -> None:
        """Readiness fails with the reason of whichever condition is missing."""
        setattr(health, field, value)
        verdict = health.readiness()
        assert not verdict.ok
        assert reason in verdict.detail["reason"]


# -- pure: what the observer counts ------------------------------------------------------------


@pytest.fixture
def observer(clock: FakeClock) -> Observer:
    """An observer with a registry of its own."""
    return Observer(Metrics(CollectorRegistry()), Health(stall_s=60, clock=clock))


def sample(observer: Observer, name: str, **labels: str) -> float:
    value = observer.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class TestObserver:
    def test_committed_batch_counts_every_outcome_per_app(self, observer: Observer) -> None:
        """A batch result's per-app outcomes land in their counters; its dead letters are the dead_lettered hook's."""
        result = BatchResult(next_offset=10, dead_lettered=2)
        result.outcomes.update({("a", "processed"): 5, ("a", "duplicate"): 1, ("b", "dead_lettered"): 1, ("b", "skipped"): 3})
        observer.batch_committed(result)
        observer.batch_committed(result)
        assert sample(observer, "rc_worker_events_processed_total", app="a") == 10
        assert sample(observer, "rc_worker_events_duplicate_total", app="a") == 2
        assert sample(observer, "rc_worker_events_skipped_total", app="b") == 6
        assert sample(observer, "rc_worker_events_dead_lettered_total", app="b") == 0
        assert sample(observer, "rc_worker_records_dead_lettered_total") == 0

    def test_dead_letters_count_per_app_or_as_whole_records(self, observer: Observer) -> None:
        """dead_lettered with an app counts its events; without one, whole records."""
        observer.dead_lettered("b", 2)
        observer.dead_lettered(None, 3)
        observer.dead_lettered("b", 1)
        assert sample(observer, "rc_worker_events_dead_lettered_total", app="b") == 3
        assert sample(observer, "rc_worker_records_dead_lettered_total") == 3

    def test_only_a_failure_that_runs_again_counts_as_a_retry(self, observer: Observer) -> None:
        """handler_failed counts a retry when the handler runs again, not when it gives up."""
        observer.handler_failed("a", RuntimeError("boom"), 1, True)
        observer.handler_failed("a", RuntimeError("boom"), 2, False)
        assert sample(observer, "rc_worker_handler_retries_total", app="a") == 1

    def test_a_conflict_counts_once_for_each_app_whose_keys_changed(self, observer: Observer) -> None:
        """Conflicts are labelled by the apps of the changed keys, or unknown when not named."""
        observer.conflict(VersionConflict("changed", keys=frozenset({("a", "id:1"), ("a", "id:2"), ("b", "as:misc:x")})))
        observer.conflict(VersionConflict("processed meanwhile"))
        assert sample(observer, "rc_worker_version_conflicts_total", app="a") == 1
        assert sample(observer, "rc_worker_version_conflicts_total", app="b") == 1
        assert sample(observer, "rc_worker_version_conflicts_total", app="unknown") == 1

    def test_handler_runs_are_timed_by_outcome(self, observer: Observer) -> None:
        """Runs reported in a lot are each observed, under their app and outcome."""
        observer.handler_runs("a", "ok", [0.001, 0.002])
        observer.handler_runs("a", "error", [0.5])
        assert sample(observer, "rc_worker_handler_duration_seconds_count", app="a", outcome="ok") == 2
        assert sample(observer, "rc_worker_handler_duration_seconds_count", app="a", outcome="error") == 1
        assert sample(observer, "rc_worker_handler_duration_seconds_sum", app="a", outcome="ok") == pytest.approx(0.003)

    def test_commits_are_timed_by_outcome(self, observer: Observer) -> None:
        """A conflicting commit is observed as a conflict, a clean one as committed."""
        with observer.commit():
            pass
        with pytest.raises(VersionConflict), observer.commit():
            raise VersionConflict("changed")
        assert sample(observer, "rc_worker_commit_duration_seconds_count", outcome="committed") == 1
        assert sample(observer, "rc_worker_commit_duration_seconds_count", outcome="conflict") == 1

    def test_the_throughput_line_counts_since_the_last_one(self, observer: Observer, clock: FakeClock) -> None:
        """Each throughput line has the events/s, conflicts, dead letters and duplicates of its own interval."""
        throughput = Throughput(clock)
        observer.polled({0: [object()] * 30})
        result = BatchResult(next_offset=30, processed=20, duplicates=4, dead_lettered=1, conflicts=2)
        result.outcomes.update({("a", "processed"): 20, ("a", "dead_lettered"): 3})
        observer.batch_committed(result)
        clock.now += 10
        first = throughput.line(observer.tally, lag=7, partitions=3)
        assert first == {
            "events_per_s": 2.0,
            "records_per_s": 3.0,
            "events": 20,
            "duplicates": 4,
            "dead_letters": 4,
            "conflicts": 2,
            "lag": 7,
            "partitions": 3,
            "interval_s": 10.0,
        }
        observer.batch_committed(BatchResult(next_offset=40, processed=5))
        clock.now += 5
        second = throughput.line(observer.tally, lag=None, partitions=3)
        assert (second["events"], second["events_per_s"], second["conflicts"], second["lag"]) == (5, 1.0, 0, None)

    def test_revoked_partitions_drop_their_lag_and_membership(self, observer: Observer) -> None:
        """A revoke removes the partitions' lag series and the worker is not a member until assigned."""
        observer.assigned({0, 1, 2})
        observer.measured_lag("t", {0: 5, 1: 0, 2: 7})
        observer.revoked({0, 1, 2})
        assert not observer.health.member
        assert observer.metrics.registry.get_sample_value("rc_worker_consumer_lag", {"topic": "t", "partition": "2"}) is None
        observer.assigned({2})
        assert observer.health.member
        assert sample(observer, "rc_worker_assigned_partitions") == 1
        assert sample(observer, "rc_worker_rebalances_total") == 2

    def test_a_lag_measured_across_a_revoke_exports_only_the_partitions_still_held(self, observer: Observer) -> None:
        """A measurement that began before a rebalance does not bring back the series the revoke removed."""
        observer.assigned({0, 1, 2, 3})
        observer.revoked({0, 1, 2, 3})
        observer.assigned({0, 2})
        observer.measured_lag("t", {0: 0, 1: 4, 2: 3, 3: 0})  # taken while 0-3 were still this worker's
        exported = {p: observer.metrics.registry.get_sample_value("rc_worker_consumer_lag", {"topic": "t", "partition": p}) for p in "0123"}
        assert exported == {"0": 0, "1": None, "2": 3, "3": None}


# -- the HTTP endpoint, for real on a free port -------------------------------------------------


@pytest.fixture
def endpoint(observer: Observer) -> Iterator[Endpoint]:
    served = Endpoint("127.0.0.1", 0, observer.metrics.registry, observer.health)
    yield served
    served.close()


class TestEndpoint:
    def test_metrics_are_served_in_prometheus_text_format(self, endpoint: Endpoint, observer: Observer) -> None:
        """/metrics is prometheus-client's exposition of the worker's registry."""
        observer.assigned({3})
        response = httpx.get(f"{endpoint.url}/metrics", timeout=5)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        families = {family.name: family for family in text_string_to_metric_families(response.text)}
        assert families["rc_worker_assigned_partitions"].samples[0].value == 1

    def test_probes_answer_200_or_503_with_the_reason(self, endpoint: Endpoint, observer: Observer) -> None:
        """/healthz passes for an idle worker; /readyz fails before the worker joined, saying so."""
        live = httpx.get(f"{endpoint.url}/healthz", timeout=5)
        ready = httpx.get(f"{endpoint.url}/readyz", timeout=5)
        assert (live.status_code, live.json()["status"]) == (200, "ok")
        assert (ready.status_code, ready.json()["status"]) == (503, "fail")
        assert "not a member" in ready.json()["reason"]

    def test_status_serves_the_monitor_s_last_view_of_the_pipeline(self, endpoint: Endpoint, observer: Observer) -> None:
        """/status is the report the monitor last took of the pipeline's Status, with both verdicts now."""
        lanes = [{"partition": 1, "paused": True, "busy": True, "attempt": 2, "last_error": None, "seconds_since_progress": 3.5}]
        observer.health.report = {"member": "w1", "partitions": lanes}
        response = httpx.get(f"{endpoint.url}/status", timeout=5)
        assert (response.status_code, response.headers["content-type"]) == (200, "application/json")
        body = response.json()
        assert (body["member"], body["partitions"]) == ("w1", lanes)
        assert set(body["liveness"]) == {"ok", "detail"}

    def test_unknown_paths_are_404(self, endpoint: Endpoint) -> None:
        """Only the documented paths exist."""
        assert httpx.get(f"{endpoint.url}/admin", timeout=5).status_code == 404

    def test_a_port_in_use_is_a_configuration_error_naming_the_key(self, observer: Observer) -> None:
        """Binding a taken port fails start-up with the key and variable to change."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match="RC_WORKER_OBSERVABILITY__PORT"):
                Endpoint("127.0.0.1", port, observer.metrics.registry, observer.health)


class TestServe:
    async def test_the_endpoint_and_monitor_run_beside_a_worker_for_the_block(self, sqlite_url: str, observer: Observer) -> None:
        """serve() answers over HTTP while the monitor checks the database, and releases the port afterwards."""
        settings = Settings(
            persistence={"url": sqlite_url},
            observability={"port": 0, "lag_interval_s": 0.2},
        )
        async with store_for(sqlite_url):
            pass  # migrated, as `rc-worker db upgrade` leaves it
        worker = Worker(settings, [])
        try:
            async with serve(settings.observability, worker.status, observer) as endpoint:
                assert endpoint is not None
                url = endpoint.url
                await wait_until(lambda: observer.health.database_ok, 10, interval=0.1, what="database checked")
                ready = await asyncio.to_thread(probe, url, "/readyz")
                served = (await asyncio.to_thread(httpx.get, f"{url}/status", timeout=5)).json()
                page = await asyncio.to_thread(httpx.get, f"{url}/metrics", timeout=5)
            assert ready["database"] is True
            assert (served["member"], served["group"], served["partitions"]) == (worker.owner, settings.kafka.group_id, [])
            assert ready["status"] == "fail"  # never joined a group: the consumer was not started
            assert f'group="{settings.kafka.group_id}"' in page.text
            assert observer.health.stopping
            assert await asyncio.to_thread(status, url, "/healthz") == 0  # the port is released
        finally:
            await worker.consumer.stop()
            await worker.producer.__aexit__(None, None, None)
            await worker.reader.__aexit__(None, None, None)
            await worker.http.aclose()
            await worker.store.close()


# -- tracing, through the real dispatcher on SQLite ---------------------------------------------


class TestTracing:
    async def test_each_event_gets_a_span_with_a_child_span_per_handler(self, sqlite_url: str) -> None:
        """With tracing on, dispatching a batch records an event span per event, each parent of its handler span."""
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        lines = read_records_file(FIXTURES / "valid.jsonl")[:5]
        records = [RawRecord("t", 0, offset, 0, r.key, r.value, r.headers) for offset, r in enumerate(lines)]
        apps = load_apps(["message-count"], {})
        async with store_for(sqlite_url) as store:
            http = Http(Settings().http)
            dispatcher = Dispatcher(apps, store, http, Topics("t.dlq", "t.cmd"), ProcessingSettings())
            try:
                with tracing.enabled_with(provider):
                    result = await dispatcher.dispatch(records, None)
            finally:
                await http.aclose()
        spans = exporter.get_finished_spans()
        events = {span.context.span_id: span for span in spans if span.name == "rc_worker.event"}
        handlers = [span for span in spans if span.name == "rc_worker.handler"]
        assert len(events) == result.processed == 5
        assert len(handlers) == 5
        assert all(h.parent is not None and h.parent.span_id in events for h in handlers)
        assert {h.attributes["rc_worker.app"] for h in handlers if h.attributes} == {"message-count"}
        assert {e.attributes["messaging.kafka.offset"] for e in events.values() if e.attributes} == set(range(5))

    def test_spans_are_free_no_ops_while_tracing_is_off(self) -> None:
        """Off, span() records nothing and needs no OpenTelemetry."""
        tracing.configure(False)
        assert not tracing.enabled()
        with tracing.span("rc_worker.batch", partition=1) as span:
            assert span is None


# -- real workers over HTTP --------------------------------------------------------------------


def endpoint_url(worker: WorkerProcess) -> str | None:
    """The worker's observability URL, once it has logged it."""
    found = worker.events("observability_listening")
    return found[-1]["url"] if found else None


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page: {(name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]], name: str) -> float:
    """The sum of one metric over every worker and label set."""
    return sum(value for found in samples for (metric, _), value in found.items() if metric == name)


def probe(url: str, path: str) -> dict[str, Any]:
    """The JSON body of a probe."""
    body: dict[str, Any] = httpx.get(f"{url}{path}", timeout=5).json()
    return body


def status(url: str, path: str) -> int:
    try:
        return httpx.get(f"{url}{path}", timeout=5).status_code
    except httpx.TransportError:
        return 0


@contextlib.asynccontextmanager
async def table_locked(url: str, table: str) -> AsyncIterator[None]:
    """Hold an exclusive lock on ``table``: every worker query on it waits until the block ends."""
    parsed = make_url(url)
    conn = await asyncpg.connect(
        user=parsed.username, password=parsed.password, host=parsed.host, port=parsed.port, database=parsed.database
    )
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
class TestTwoWorkers:
    async def test_metrics_follow_a_run_of_events_until_lag_is_zero(
        self, topics: TopicSet, postgres_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """Two workers: lag shows while processing is held, then processed reaches the total and lag 0."""
        env = topics.env(postgres_url, RC_WORKER_OBSERVABILITY__LAG_INTERVAL_S="0.5", RC_WORKER_KAFKA__MAX_BATCH_RECORDS="50")
        rc_worker("db", "upgrade", env=env)
        events = tmp_path / "events.jsonl"
        totals = make_events(events, count=600, rooms=8, seed=11, duplicate_every=50, invalid_every=100)
        records = totals["events"] + totals["duplicates"] + totals["invalid"]
        # One member uses static membership (KIP-345), which aiokafka supports.
        workers = [
            start_worker({**env, "RC_WORKER_KAFKA__GROUP_INSTANCE_ID": f"{topics.group_id}-a"}, "a"),
            start_worker(env, "b"),
        ]
        urls = await wait_until(lambda: all(map(endpoint_url, workers)) and [endpoint_url(w) for w in workers], 30, what="endpoints")

        def settled() -> bool:
            found = [scrape(url) for url in urls]
            return total(found, "rc_worker_assigned_partitions") == 6 and all(status(url, "/readyz") == 200 for url in urls)

        await wait_until(settled, 60, what="both workers ready, six partitions between them")

        # Nothing can be processed while processed_events is locked: the lag must show.
        async with table_locked(postgres_url, "processed_events"):
            rc_worker("load", str(events), env=env)

            def held() -> Any:
                found = [scrape(url) for url in urls]
                return total(found, "rc_worker_consumer_lag") > 0 and found

            during = await wait_until(held, 60, what="lag while processing is held")
            assert total(during, "rc_worker_events_processed_total") == 0
            assert all(status(url, "/readyz") == 200 and status(url, "/healthz") == 200 for url in urls)

        def drained() -> Any:
            found = [scrape(url) for url in urls]
            processed = total(found, "rc_worker_events_processed_total")
            lag_series = [v for f in found for (name, _), v in f.items() if name == "rc_worker_consumer_lag"]
            return processed == totals["events"] and len(lag_series) == 6 and sum(lag_series) == 0 and found

        after = await wait_until(drained, 90, what="every event processed and lag 0")
        assert total(after, "rc_worker_events_duplicate_total") == totals["duplicates"]
        assert total(after, "rc_worker_records_dead_lettered_total") == totals["invalid"]
        assert total(after, "rc_worker_records_consumed_total") >= records
        assert total(after, "rc_worker_handler_duration_seconds_count") >= totals["events"]
        assert total(after, "rc_worker_commit_duration_seconds_count") > 0
        assert all(status(url, "/readyz") == 200 and status(url, "/healthz") == 200 for url in urls)
        assert [w.terminate() for w in workers] == [0, 0]
        assert any(w.events("consumer_lag") for w in workers)


@pytest.mark.kafka
class TestThroughputLine:
    async def test_a_worker_at_info_logs_throughput_lines_and_no_batch_lines(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """At the info level a worker logs a periodic throughput line whose events add up, and no per-batch lines."""
        env = topics.env(sqlite_url, RC_WORKER_LOGGING__LEVEL="info", RC_WORKER_OBSERVABILITY__LAG_INTERVAL_S="0.5")
        rc_worker("db", "upgrade", env=env)
        events = tmp_path / "events.jsonl"
        totals = make_events(events, count=300, rooms=6, seed=5, duplicate_every=30)
        worker = start_worker(env, "w")
        rc_worker("load", str(events), env=env)

        def counted() -> bool:  # events dispatched, the duplicates among them
            return sum(line["events"] for line in worker.events("throughput")) == totals["events"] + totals["duplicates"]

        await wait_until(counted, 90, what="throughput lines adding up to every event")
        assert worker.terminate() == 0
        lines = worker.events("throughput")
        assert sum(line["duplicates"] for line in lines) == totals["duplicates"]
        assert all({"events_per_s", "lag", "conflicts"} <= line.keys() for line in lines)
        assert any(line["events_per_s"] > 0 for line in lines)
        assert worker.events("batch_committed") == []


# -- a broker outage, on a broker of this test's own ---------------------------------------------

OUTAGE_PORT = 19092


def _broker(action: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}  # never someone else's broker
    env |= {"KAFKA_PORT": str(OUTAGE_PORT), "KAFKA_WIPE": "1" if action == "wipe" else "0"}
    command = "stop" if action == "wipe" else action
    result = subprocess.run(
        ["bash", str(ROOT / "docker" / "local" / "kafka.sh"), command], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise AssertionError(f"kafka.sh {command} on port {OUTAGE_PORT} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""


@pytest.fixture
def own_broker() -> Iterator[str]:
    """A broker of this test's own on port 19092, wiped at the end."""
    bootstrap = _broker("start")
    try:
        yield bootstrap
    finally:
        _broker("wipe")


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
class TestBrokerOutage:
    async def test_live_throughout_and_ready_again_after_a_broker_outage(
        self, own_broker: str, postgres_url: str, tmp_path: Path, start_worker: StartWorker
    ) -> None:
        """While the broker is down /readyz fails and /healthz passes; both pass once it is back, and work resumes."""
        name = f"o-{uuid.uuid4().hex[:10]}"
        topic_set = TopicSet(own_broker, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
        await create_topics(topic_set.kafka_settings(), partitions=3)
        env = topic_set.env(postgres_url, RC_WORKER_OBSERVABILITY__LAG_INTERVAL_S="1")
        rc_worker("db", "upgrade", env=env)
        first = make_events(tmp_path / "first.jsonl", count=50, seed=21)
        rc_worker("load", str(tmp_path / "first.jsonl"), env=env)
        worker = start_worker(env, "worker")
        url = await wait_until(lambda: endpoint_url(worker), 30, what="endpoint")
        await wait_until(lambda: status(url, "/readyz") == 200, 60, what="ready")
        await wait_until(lambda: total([scrape(url)], "rc_worker_events_processed_total") == first["events"], 60, what="first events")

        liveness: list[int] = []

        def unready() -> bool:
            liveness.append(status(url, "/healthz"))
            return status(url, "/readyz") == 503

        _broker("stop")
        await wait_until(unready, 60, what="not ready during the outage")
        reason = probe(url, "/readyz")["reason"]
        _broker("start")
        await wait_until(lambda: liveness.append(status(url, "/healthz")) or status(url, "/readyz") == 200, 120, what="ready again")

        second = make_events(tmp_path / "second.jsonl", count=30, seed=22)
        rc_worker("load", str(tmp_path / "second.jsonl"), env=env)
        expected = first["events"] + second["events"]
        await wait_until(lambda: total([scrape(url)], "rc_worker_events_processed_total") == expected, 90, what="work resumed")
        assert "coordinator" in reason or "member" in reason  # the broker's side, not the database's
        assert set(liveness) == {200}
        assert worker.terminate() == 0
