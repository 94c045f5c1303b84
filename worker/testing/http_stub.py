"""A local HTTP server that answers a handler's http calls with canned responses and records the requests."""

from __future__ import annotations

import http.server
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson


@dataclass(frozen=True, slots=True)
class StubRequest:
    """A request an :class:`HttpStub` received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


Route = Callable[[StubRequest], "tuple[int, Any] | tuple[int, Any, Mapping[str, str]]"]


class HttpStub:
    """A real HTTP server on 127.0.0.1, in a thread, for testing handlers that call services.

    Each route answers ``"METHOD /path"`` with ``(status, body)`` or ``(status, body,
    headers)``; a dict or list body is sent as JSON, str as text, bytes as they are, and an
    iterator of bytes is streamed without a content-length. Requests are served one at a
    time, so routes may keep counters without locks. Example::

        with HttpStub({"GET /weather": lambda request: (200, {"sky": "blue"})}) as stub:
            ...  # settings={"url": stub.url + "/weather"}
        assert stub.requests[0].method == "GET"

    Attributes:
        url: ``http://127.0.0.1:<port>``, set once started.
        requests: every request received, in order.

    """

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self.requests: list[StubRequest] = []
        self.url = ""
        self._server: http.server.HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HttpStub:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                stub._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="http-stub")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def count(self, route: str) -> int:
        """How many requests matched ``"METHOD /path"``."""
        method, _, path = route.partition(" ")
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("content-length") or 0)
        request = StubRequest(
            handler.command,
            parts.path,
            parse_qs(parts.query),
            {k.lower(): v for k, v in handler.headers.items()},
            handler.rfile.read(length),
        )
        self.requests.append(request)
        route = self.routes.get(f"{request.method} {request.path}")
        try:
            answer = route(request) if route else (404, {"error": f"no route for {request.method} {request.path}"})
        except Exception as exc:  # noqa: BLE001 - a failing route answers 500, as a failing service would
            answer = (500, {"error": f"{type(exc).__name__}: {exc}"})
        status, body, headers = answer if len(answer) == 3 else (*answer, {})
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if isinstance(body, Iterator):
            handler.end_headers()
            for chunk in body:
                handler.wfile.write(chunk)
            return
        raw, content_type = _body(body)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)


class _QuietServer(http.server.HTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and closed its socket is what some tests do on purpose.
        return None


def _body(body: Any) -> tuple[bytes, str]:
    if isinstance(body, bytes):
        return body, "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return orjson.dumps(body), "application/json"


class RecordingTransport(httpx.AsyncBaseTransport):
    """Sends the http accessor's requests, counting them by method and URL (without the query)."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._network = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Count the request, then send it."""
        self.calls[f"{request.method} {request.url.copy_with(query=None)}"] += 1
        return await self._network.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._network.aclose()
