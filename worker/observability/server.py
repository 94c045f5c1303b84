"""The HTTP endpoint (/metrics, /healthz, /readyz), served from a thread of its own, and serve(): it and the monitor beside the loop.

The server runs in a thread so that /healthz still answers, and says so, when the event loop itself is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator
from http.server import ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from urllib.parse import urlparse

import structlog
from prometheus_client import (
    CollectorRegistry,
)
from prometheus_client.exposition import MetricsHandler

from worker import tracing
from worker.config import ObservabilitySettings
from worker.errors import ConfigError
from worker.observability.health import Health
from worker.observability.metrics import Observer, observe
from worker.observability.monitor import Monitor
from worker.pipeline.status import Status

log = structlog.get_logger("worker.observability")


class Endpoint:
    """The HTTP server for /metrics, /healthz and /readyz, answering from its own thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        handler = type("Handler", (_Handler,), {"registry": registry, "health": health})
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), handler)
        except OSError as exc:
            raise ConfigError(
                f"observability: cannot listen on {host}:{port} ({exc.strerror}); set observability.port "
                "(RC_WORKER_OBSERVABILITY__PORT) to a free port, or 0 for any, or observability.enabled false"
            ) from exc
        self.host = host
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="rc-worker-http")
        self._thread.daemon = True  # never keeps the process alive on its own
        self._thread.start()

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:9464."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

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
        if path in ("/healthz", "/livez"):
            verdict = self.health.liveness()
        elif path == "/readyz":
            verdict = self.health.readiness()
        else:
            self._reply(404, {"error": "not found", "paths": ["/metrics", "/healthz", "/readyz"]})
            return
        self._reply(200 if verdict.ok else 503, {"status": "ok" if verdict.ok else "fail", **verdict.detail})

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)


@contextlib.asynccontextmanager
async def serve(settings: ObservabilitySettings, status: Status, observer: Observer = observe) -> AsyncIterator[Endpoint | None]:
    """Serve the endpoint (when enabled) and run the monitor beside the worker whose ``status`` is given, for the block.

    Raises:
        ConfigError: the port cannot be bound, or tracing is on without OpenTelemetry.

    """
    observer.health.stall_s = settings.liveness_stall_s
    observer.metrics.info.info({"version": _version(), "group": status.group_id, "topic": status.topic})
    tracing.configure(settings.tracing)
    endpoint = None
    if settings.enabled:
        endpoint = Endpoint(settings.host, settings.port, observer.metrics.registry, observer.health)
        log.info("observability_listening", host=endpoint.host, port=endpoint.port, url=endpoint.url)
    monitor = asyncio.create_task(Monitor(settings, status, observer).run(), name="observability-monitor")
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
