"""The ``http`` accessor: outgoing HTTP for handlers, through one shared httpx client.

A handler that conflicts is run again on fresh data, so any request it makes may be made
more than once: use http for reads and for idempotent calls, and stage changes to the chat
through ``modify`` (published exactly once, after commit) instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from worker.errors import HttpError

DEFAULT_TIMEOUT_S = 10.0
MAX_RESPONSE_BYTES = 5_000_000


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a request returned: status, headers, body text, and the body parsed as JSON if it is."""

    url: str
    status_code: int
    headers: dict[str, str]
    content: str
    data: Any


class Http:
    """``http.get/post/put/delete/patch(url, headers=, params=, json=, content=, timeout=)``."""

    def __init__(self, client: httpx.AsyncClient | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self._client = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=True)
        self._timeout_s = timeout_s

    async def aclose(self) -> None:
        """Close the shared client."""
        await self._client.aclose()

    async def request(self, method: str, url: str, **options: Any) -> HttpResponse:
        """Send one request; raise HttpError on connection failure, timeout or oversized body."""
        options.setdefault("timeout", self._timeout_s)
        try:
            response = await self._client.request(method, url, **options)
        except httpx.HTTPError as exc:
            raise HttpError(f"{method} {url} failed: {type(exc).__name__}: {exc}") from exc
        if len(response.content) > MAX_RESPONSE_BYTES:
            raise HttpError(f"{method} {url}: response of {len(response.content)} bytes is over {MAX_RESPONSE_BYTES}")
        try:
            data = orjson.loads(response.content) if response.content else None
        except orjson.JSONDecodeError:
            data = None
        return HttpResponse(str(response.url), response.status_code, dict(response.headers), response.text, data)

    async def get(self, url: str, **options: Any) -> HttpResponse:
        """GET ``url``."""
        return await self.request("GET", url, **options)

    async def post(self, url: str, **options: Any) -> HttpResponse:
        """POST to ``url``."""
        return await self.request("POST", url, **options)

    async def put(self, url: str, **options: Any) -> HttpResponse:
        """PUT to ``url``."""
        return await self.request("PUT", url, **options)

    async def delete(self, url: str, **options: Any) -> HttpResponse:
        """DELETE ``url``."""
        return await self.request("DELETE", url, **options)

    async def patch(self, url: str, **options: Any) -> HttpResponse:
        """PATCH ``url``."""
        return await self.request("PATCH", url, **options)
