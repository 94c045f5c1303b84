"""One client of Rocket.Chat's REST API (``/api/v1``), authenticated as the worker's user.

httpx's exceptions and Rocket.Chat's error answers are translated here, and only here, into
:class:`RocketChatError`, which says whether calling again may help.
"""

from __future__ import annotations

from typing import Any

import httpx

from worker.config import RocketChatSettings
from worker.errors import WorkerError

# Statuses after which the same call may succeed later: rate limited, or the server failed.
_RETRIABLE = {429, 500, 502, 503, 504}


class RocketChatError(WorkerError):
    """Raised when a REST call fails: ``status`` (0: no answer), Rocket.Chat's ``error``, ``retry_after`` seconds if it said."""

    def __init__(self, status: int, error: str, retry_after: float | None = None) -> None:
        super().__init__(f"Rocket.Chat answered {status}: {error}" if status else f"Rocket.Chat could not be reached: {error}")
        self.status = status
        self.error = error
        self.retry_after = retry_after
        self.retriable = status == 0 or status in _RETRIABLE


class RocketChatClient:
    """``await client.call("GET", "users.info", params={"userId": ...})`` returns the answer's JSON object.

    Args:
        settings: the ``rocketchat`` section; it must be configured (url, user_id, auth_token).
        transport: an httpx transport to use instead of the network (tests).

    """

    def __init__(self, settings: RocketChatSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        if settings.url is None or settings.user_id is None or settings.auth_token is None:
            raise ValueError("rocketchat.url, rocketchat.user_id and rocketchat.auth_token must be set to call Rocket.Chat")
        self.settings = settings
        self._client = httpx.AsyncClient(
            base_url=settings.url.rstrip("/") + "/api/v1/",
            headers={"X-User-Id": settings.user_id, "X-Auth-Token": settings.auth_token.get_secret_value()},
            transport=transport,
            timeout=10.0,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def call(self, method: str, endpoint: str, *, params: dict[str, Any] | None = None, json: Any = None) -> dict[str, Any]:
        """Call ``endpoint`` (e.g. ``"users.info"``); returns the JSON object Rocket.Chat answered.

        Raises:
            RocketChatError: no answer, a 4xx/5xx status, or ``"success": false``.

        """
        try:
            response = await self._client.request(method, endpoint, params=params, json=json)
        except httpx.HTTPError as exc:  # the one boundary where httpx's errors are translated
            raise RocketChatError(0, f"{method} {endpoint}: {type(exc).__name__}: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        if response.status_code >= 400 or body.get("success") is False:
            error = str(body.get("error") or body.get("message") or response.reason_phrase)
            raise RocketChatError(response.status_code, f"{method} {endpoint}: {error}", _retry_after(response))
        return body


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
