"""The HTTP endpoint (/metrics, /healthz, /readyz, /status), served from a thread of its own, and serve(): it and the monitor beside the loop.

The server runs in a thread so that /healthz still answers, and says so, when the event loop itself is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable
from http.server import ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import structlog
from prometheus_client import (
    CollectorRegistry,
)
from prometheus_client.exposition import MetricsHandler

from worker import tracing
from worker.config import ObservabilitySettings
from worker.observability.asgi import Addressed, AsgiEndpoint, cannot_listen
from worker.observability.health import Health
from worker.observability.metrics import Observer, observe
from worker.observability.monitor import Monitor
from worker.pipeline.status import Status

if TYPE_CHECKING:
    from starlette.types import ASGIApp

log = structlog.get_logger("worker.observability")


class Endpoint(Addressed):
    """The HTTP server for /metrics, /healthz, /readyz and /status, answering from its own thread."""

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
    """prometheus-client's exposition at /metrics, JSON verdicts at /healthz and /readyz, the pipeline's status at /status."""

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


@contextlib.asynccontextmanager
async def serve(
    settings: ObservabilitySettings, status: Status, observer: Observer = observe, pages: Callable[[], ASGIApp] | None = None
) -> AsyncIterator[Endpoint | AsgiEndpoint | None]:
    """Serve the endpoint (when enabled; with ``pages`` when ``web`` is on) and run the monitor beside the worker whose ``status`` is given.

    Raises:
        ConfigError: the port cannot be bound, or tracing is on without OpenTelemetry.

    """
    observer.health.stall_s = settings.liveness_stall_s
    observer.metrics.info.info({"version": _version(), "group": status.group_id, "topic": status.topic})
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
    monitor = asyncio.create_task(Monitor(settings, status, observer, url).run(), name="observability-monitor")
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


def _version() -> str:
    try:
        return version("rc-apps-worker")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"
