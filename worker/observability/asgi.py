"""The observability endpoint with the status pages beside the probes (``observability.web: true``).

The same /metrics, /healthz, /readyz and /status as the plain endpoint, and the status pages
(``worker.web``) on every other path, served by uvicorn in a thread with an event loop of its
own: the probes still answer, and say so, when the worker's loop is stuck, and the pages'
sampling and database reads never compete with the worker's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from worker.errors import ConfigError

# How long start-up may take before the endpoint counts as failed.
START_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    """uvicorn's server, leaving signals to the worker (it drains on SIGTERM itself)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Install no handlers."""
        yield


def cannot_listen(host: str, port: int, exc: OSError) -> ConfigError:
    """The error of an observability endpoint whose port cannot be bound."""
    return ConfigError(
        f"observability: cannot listen on {host}:{port} ({exc.strerror}); set observability.port "
        "(RC_WORKER_OBSERVABILITY__PORT) to a free port, or 0 for any, or observability.enabled false"
    )


class Addressed:
    """Where an endpoint listens (``host``, ``port``), as URLs."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The base URL, e.g. http://127.0.0.1:9464."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def advertised_url(self) -> str:
        """The URL other processes reach it at: the host name when listening on every address."""
        if self.host in ("0.0.0.0", "::"):  # noqa: S104 - comparing, not binding
            return f"http://{socket.gethostname()}:{self.port}"
        return self.url


class AsgiEndpoint(Addressed):
    """Probes and pages on one port, from a thread of their own; the same face as the plain endpoint."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        probes: Callable[[str], tuple[int, dict[str, object]]],
        pages: Callable[[], ASGIApp],
    ) -> None:
        try:
            self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
        except OSError as exc:
            raise cannot_listen(host, port, exc) from exc
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._registry = registry
        self._probes = probes
        self._pages = pages
        self._server: _Server | None = None
        self._failure: BaseException | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="rc-worker-http", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S) or self._failure is not None:
            self.close()
            raise ConfigError(f"observability: the status pages on port {self.port} did not start: {self._failure or 'timed out'}")

    def _app(self) -> Starlette:
        async def metrics(_request: Request) -> Response:
            return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)

        async def probe(request: Request) -> Response:
            status, body = self._probes(request.url.path)
            return JSONResponse(body, status_code=status, headers={"Cache-Control": "no-store"})

        pages = self._pages()
        routes = [Route("/metrics", metrics), *(Route(path, probe) for path in ("/healthz", "/livez", "/readyz", "/status"))]
        return Starlette(routes=[*routes, Mount("/", pages)], lifespan=_lifespan_of(pages))

    def _serve(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread, which raises ConfigError
            self._failure = exc
            self._started.set()

    async def _run(self) -> None:
        config = uvicorn.Config(self._app(), log_config=None, access_log=False, lifespan="on", server_header=False)
        self._server = _Server(config)
        serving = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started and not serving.done():  # noqa: ASYNC110 - uvicorn has a flag, no event
            await asyncio.sleep(0.02)
        self._started.set()
        await serving

    def close(self) -> None:
        """Stop serving (the pages' sampling too) and release the port."""
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def _lifespan_of(app: ASGIApp) -> Callable[[Starlette], contextlib.AbstractAsyncContextManager[None]]:
    """Run the mounted app's own lifespan (Starlette does not run a mounted app's)."""

    @contextlib.asynccontextmanager
    async def lifespan(_outer: Starlette) -> AsyncIterator[None]:
        context = getattr(getattr(app, "router", None), "lifespan_context", None)
        if context is None:
            yield
            return
        async with context(app):
            yield

    return lifespan
