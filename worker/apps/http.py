"""The ``http`` accessor: outgoing HTTP for handlers, through one shared httpx client.

A handler that conflicts is run again on fresh data, so any request it makes may be made
more than once: use http for reads and for idempotent calls, and stage changes to the chat
through ``modify`` (published exactly once, after commit) instead. httpx's exceptions are
translated here, and only here, into :class:`~worker.errors.HttpError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from worker.config import HttpSettings
from worker.errors import HttpError

if TYPE_CHECKING:
    import httpx


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a request returned (the Apps-Engine's ``IHttpResponse``).

    Attributes:
        method: the request method, e.g. ``"GET"``.
        url: the final URL, after redirects.
        status_code: the HTTP status; 4xx and 5xx are returned, not raised (see
            :meth:`raise_for_status`).
        headers: the response headers, names in lower case.
        content: the body as text.
        data: the body parsed as JSON, or None when it is empty or not JSON.

    """

    method: str
    url: str
    status_code: int
    headers: dict[str, str]
    content: str
    data: Any

    @property
    def text(self) -> str:
        """The body as text (httpx's name for ``content``)."""
        return self.content

    @property
    def ok(self) -> bool:
        """True for a 2xx status."""
        return 200 <= self.status_code < 300

    def raise_for_status(self) -> HttpResponse:
        """Return the response if its status is 2xx or 3xx, else raise HttpError with the status.

        Raises:
            HttpError: the status is 4xx or 5xx; ``status_code`` is set on the error.

        """
        if self.status_code >= 400:
            raise HttpError(f"{self.method} {self.url} answered {self.status_code}: {self.content[:200]}", status_code=self.status_code)
        return self


class Http:
    """``http.get/post/put/delete/patch(url, *, headers=, params=, json= (or data=), content=, timeout=)``.

    One instance (one connection pool) serves every handler of a worker. Each call is bounded
    by ``http.timeout_s`` from connect to last byte, and reads at most
    ``http.max_response_bytes`` of body; both come from config.yaml.
    """

    def __init__(self, settings: HttpSettings | None = None, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        # httpx when a client is made, not when a handler module imports HttpResponse: it costs
        # every rc-worker command a tenth of a second of start-up.
        import httpx

        self.settings = settings or HttpSettings()
        self._errors: type[Exception] = httpx.HTTPError
        self._client = httpx.AsyncClient(timeout=self.settings.timeout_s, follow_redirects=True, transport=transport)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        content: str | bytes | None = None,
        data: Any = None,
        timeout: float | None = None,  # noqa: ASYNC109 - the per-call option httpx users expect; capped below
    ) -> HttpResponse:
        """Send one request and read its response.

        Args:
            method: GET, POST, PUT, DELETE or PATCH.
            url: an absolute http:// or https:// URL.
            headers: request headers.
            params: query parameters, added to the URL.
            json: a body to send as JSON (sets content-type).
            content: a raw body; give ``json`` or ``content``, not both.
            data: the Apps-Engine's name (``IHttpRequest.data``) for ``json``: sent as JSON.
            timeout: seconds for this call; never longer than ``http.timeout_s``.

        Raises:
            HttpError: the connection failed, the call timed out, or the body is over
                ``http.max_response_bytes``. It is retriable: the handler's run is retried.

        """
        if data is not None:
            if json is not None:
                raise ValueError("data= is the Apps-Engine's name for json=: give one of them")
            json = data
        if json is not None and content is not None:
            raise ValueError("give json= or content=, not both")
        limit_s = min(timeout, self.settings.timeout_s) if timeout is not None else self.settings.timeout_s
        body = orjson.dumps(json) if json is not None else content
        send_headers = dict(headers or {})
        if json is not None:
            send_headers.setdefault("content-type", "application/json")
        # Imported here, not with the module: the App contract imports this module, and
        # check-config and handlers (which load the apps but run nothing) start without asyncio.
        import asyncio

        try:
            async with asyncio.timeout(limit_s):
                return await self._send(method, url, send_headers, params, body, limit_s)
        except TimeoutError:
            raise HttpError(f"{method} {url} took longer than {limit_s}s; raise http.timeout_s or make the service faster") from None
        except self._errors as exc:  # httpx.HTTPError: the one boundary where httpx's errors are translated
            raise HttpError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc

    async def _send(
        self, method: str, url: str, headers: dict[str, str], params: Mapping[str, Any] | None, body: str | bytes | None, timeout_s: float
    ) -> HttpResponse:
        limit = self.settings.max_response_bytes
        request = self._client.build_request(method, url, headers=headers, params=params, content=body, timeout=timeout_s)
        response = await self._client.send(request, stream=True)
        try:
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise HttpError(_too_large(method, url, f"declares {declared} bytes", limit))
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:  # stop reading: a hostile or broken server cannot fill memory
                    raise HttpError(_too_large(method, url, f"is over {size} bytes", limit))
                chunks.append(chunk)
        finally:
            await response.aclose()
        raw = b"".join(chunks)
        text = raw.decode(response.encoding or "utf-8", errors="replace")
        return HttpResponse(method, str(response.url), response.status_code, dict(response.headers), text, _json(raw))

    async def get(self, url: str, **options: Any) -> HttpResponse:
        """GET ``url``; options as for :meth:`request`."""
        return await self.request("GET", url, **options)

    async def post(self, url: str, **options: Any) -> HttpResponse:
        """POST to ``url``; options as for :meth:`request`."""
        return await self.request("POST", url, **options)

    async def put(self, url: str, **options: Any) -> HttpResponse:
        """PUT to ``url``; options as for :meth:`request`."""
        return await self.request("PUT", url, **options)

    async def delete(self, url: str, **options: Any) -> HttpResponse:
        """DELETE ``url``; options as for :meth:`request`."""
        return await self.request("DELETE", url, **options)

    async def patch(self, url: str, **options: Any) -> HttpResponse:
        """PATCH ``url``; options as for :meth:`request`."""
        return await self.request("PATCH", url, **options)


def _too_large(method: str, url: str, what: str, limit: int) -> str:
    return f"{method} {url}: the response {what}, over http.max_response_bytes ({limit}); raise it in config.yaml if this is expected"


def _json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
