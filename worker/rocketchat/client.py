"""One authenticated client of Rocket.Chat's REST API (``/api/v1``); httpx errors stop here.

Every call answers the decoded JSON body or raises RocketChatError with the HTTP status, the
server's ``error`` text and, when it throttles, how long it asked to wait: Retry-After if
given, else Rocket.Chat's own ``X-RateLimit-Reset`` (the epoch milliseconds its window ends).
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson

from worker.config import RocketChatSettings
from worker.errors import RocketChatError

API_PREFIX = "/api/v1/"


class RocketChatClient:
    """Calls Rocket.Chat as the account of ``rocketchat.user_id`` (headers X-User-Id and X-Auth-Token).

    Use it as an async context manager, or call :meth:`aclose` when done. ``transport`` replaces
    the network (tests hand in an ``httpx.ASGITransport`` over a fake server).
    """

    def __init__(self, settings: RocketChatSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self._client = httpx.AsyncClient(
            base_url=settings.url.rstrip("/") + API_PREFIX,
            headers={"X-User-Id": settings.user_id, "X-Auth-Token": settings.auth_token.get_secret_value()},
            timeout=settings.timeout_s,
            transport=transport,
        )

    async def __aenter__(self) -> RocketChatClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._client.aclose()

    async def call(self, method: str, endpoint: str, *, params: dict[str, Any] | None = None, json: Any = None) -> dict[str, Any]:
        """Call ``endpoint`` (e.g. ``chat.sendMessage``) and return its JSON body.

        Raises:
            RocketChatError: no answer (status 0), an HTTP error status, or ``success: false``.

        """
        name = endpoint.lstrip("/")
        try:
            response = await self._client.request(method, name, params=params, json=json)
        except httpx.TimeoutException as exc:
            raise RocketChatError(0, f"{method} {name} timed out after {self.settings.timeout_s}s (rocketchat.timeout_s)") from exc
        except httpx.HTTPError as exc:
            raise RocketChatError(0, f"{method} {name} at {self.settings.url} failed: {exc!r}; is rocketchat.url right?") from exc
        body = _json_object(response.content)
        if response.is_success and body.get("success", True) is not False:
            return body
        error = body.get("error") or body.get("message") or response.reason_phrase or "no reason given"
        raise RocketChatError(response.status_code, f"{name}: {error}", retry_after(response.headers))


def _json_object(content: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(content) if content else {}
    except orjson.JSONDecodeError:
        return {"error": content[:200].decode("utf-8", "replace")}
    return body if isinstance(body, dict) else {"error": f"unexpected JSON {type(body).__name__}"}


def retry_after(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds the server asked to wait: Retry-After (seconds or an HTTP date), else X-RateLimit-Reset; None if neither."""
    now = time.time() if now is None else now
    given = headers.get("retry-after")
    if given:
        try:
            return max(0.0, float(given))
        except ValueError:
            pass
        try:
            return max(0.0, parsedate_to_datetime(given).timestamp() - now)
        except (TypeError, ValueError):
            pass
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            at = float(reset)
        except ValueError:
            return None
        # Rocket.Chat sends epoch milliseconds; seconds are accepted as other servers send them.
        return max(0.0, (at / 1000 if at > 1e11 else at) - now)
    return None
