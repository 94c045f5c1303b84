"""A local server that answers as Rocket.Chat's REST API does, for the endpoints the project calls.

Built from Rocket.Chat's sources and developer docs (see tests/fixtures/rocketchat/README.md):
auth by X-User-Id/X-Auth-Token (401 otherwise); ``chat.sendMessage`` takes a client-chosen
``_id`` and, when a message with that id exists, answers it again instead of inserting a
second one; text over Message_MaxAllowedSize (5000) is refused; ``chat.update`` replaces
``customFields`` and ``msg``; ``chat.react`` toggles unless ``shouldReact`` is given;
``chat.getMessage`` answers a missing message with a bare 400 and one of a room the caller
cannot access with 400 error-not-allowed; ``chat.delete`` refuses (400) a message it does not
have or one of another room;
``im.create`` answers the direct room of the caller and a user, creating it only the first
time, and refuses (400) an unknown username; ``users.info`` finds a user by ``userId``, else
``username``, answers ``{user, success}``, 400 ``User not found.`` for one it does not know and
400 ``Invalid search query.`` without either; a rate limit per endpoint answers 429 with
Retry-After and X-RateLimit-* headers.

Use :class:`FakeRocketChat` in-process through ``httpx.ASGITransport(fake.app)``, or serve it
on a loopback port in a thread with :meth:`FakeRocketChat.serve` for other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

MAX_ALLOWED_SIZE = 5000  # Message_MaxAllowedSize's default


@dataclass
class Call:
    """One request as the fake received it."""

    method: str
    endpoint: str
    body: Any
    params: dict[str, str]
    status: int


@dataclass
class FakeRocketChat:
    """The server's state: users' credentials, messages, calls; knobs for rate limits and failures."""

    user_id: str = "apply-bot-id"
    auth_token: str = "apply-token"  # noqa: S105 - a test credential
    username: str = "apply.bot"
    rate_limit: int | None = None  # calls per endpoint per window, then 429
    rate_window_s: float = 60.0
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    inserts: Counter[str] = field(default_factory=Counter)  # message id -> times inserted
    deletes: Counter[str] = field(default_factory=Counter)  # message id -> times deleted
    users: dict[str, str] = field(default_factory=lambda: {"alice": "u-1"})  # username -> user id, besides the caller
    direct_rooms: dict[str, dict[str, Any]] = field(default_factory=dict)  # room id -> direct room
    rooms_created: Counter[str] = field(default_factory=Counter)  # room id -> times created
    hidden_rooms: set[str] = field(default_factory=set)  # rooms the caller cannot access: chat.getMessage refuses their messages
    failures: dict[str, list[int]] = field(default_factory=dict)  # endpoint -> statuses to answer next
    journal: Path | None = None  # every call also appended here as a JSON line (other processes read it)

    def __post_init__(self) -> None:
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self.app = Starlette(
            routes=[
                Route("/api/v1/chat.sendMessage", self._send_message, methods=["POST"]),
                Route("/api/v1/chat.update", self._update, methods=["POST"]),
                Route("/api/v1/chat.react", self._react, methods=["POST"]),
                Route("/api/v1/chat.getMessage", self._get_message, methods=["GET"]),
                Route("/api/v1/chat.delete", self._delete, methods=["POST"]),
                Route("/api/v1/im.create", self._im_create, methods=["POST"]),
                Route("/api/v1/users.info", self._users_info, methods=["GET"]),
            ]
        )

    def add_message(self, message_id: str, room_id: str, text: str, **fields: Any) -> dict[str, Any]:
        """Put a message in the server as if a user had sent it."""
        now = _now()
        message = {"_id": message_id, "rid": room_id, "msg": text, "ts": now, "_updatedAt": now, "u": {"_id": "u-1", "username": "alice"}}
        message.update(fields)
        self.messages[message_id] = message
        return message

    def fail_next(self, endpoint: str, *statuses: int) -> None:
        """Answer the next calls of ``endpoint`` with these statuses (e.g. 502), in order."""
        self.failures.setdefault(endpoint, []).extend(statuses)

    def count(self, endpoint: str, status: int | None = None) -> int:
        """How many calls of ``endpoint`` (with ``status``) the fake answered."""
        return sum(1 for c in self.calls if c.endpoint == endpoint and (status is None or c.status == status))

    # -- the endpoints ---------------------------------------------------------------------

    async def _send_message(self, request: Request) -> JSONResponse:
        body, refusal = await self._admit(request, "chat.sendMessage")
        if refusal is not None:
            return refusal
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, dict):
            return self._answer(request, "chat.sendMessage", body, 400, {"success": False, "error": "The 'message' param is required"})
        if not message.get("rid"):
            return self._answer(
                request, "chat.sendMessage", body, 400, {"success": False, "error": "The 'rid' property on the message object is missing."}
            )
        if len(message.get("msg") or "") > MAX_ALLOWED_SIZE:
            error = {
                "success": False,
                "error": "Message size exceeds Message_MaxAllowedSize [error-message-size-exceeded]",
                "errorType": "error-message-size-exceeded",
            }
            return self._answer(request, "chat.sendMessage", body, 400, error)
        if "ts" in message:
            return self._answer(request, "chat.sendMessage", body, 400, {"success": False, "error": "Match error: Unexpected key 'ts'"})
        existing = self.messages.get(message.get("_id") or "")
        if existing is None:
            existing = self._insert(message)
        return self._answer(request, "chat.sendMessage", body, 200, {"message": existing, "success": True})

    def _insert(self, message: dict[str, Any]) -> dict[str, Any]:
        message_id = message.get("_id") or f"gen{len(self.messages):014d}"
        now = _now()
        stored = {**message, "_id": message_id, "ts": now, "_updatedAt": now, "u": {"_id": self.user_id, "username": self.username}}
        self.messages[message_id] = stored
        self.inserts[message_id] += 1
        return stored

    async def _update(self, request: Request) -> JSONResponse:
        body, refusal = await self._admit(request, "chat.update")
        if refusal is not None:
            return refusal
        if not isinstance(body, dict) or not body.get("roomId") or not body.get("msgId") or "text" not in body:
            return self._answer(
                request, "chat.update", body, 400, {"success": False, "error": "Match error: roomId, msgId and text are required"}
            )
        message = self.messages.get(body["msgId"])
        if message is None:
            return self._answer(
                request, "chat.update", body, 400, {"success": False, "error": f'No message found with the id of "{body["msgId"]}".'}
            )
        if message["rid"] != body["roomId"]:
            return self._answer(
                request,
                "chat.update",
                body,
                400,
                {"success": False, "error": "The room id provided does not match where the message is from."},
            )
        if len(body["text"]) > MAX_ALLOWED_SIZE:
            return self._answer(
                request,
                "chat.update",
                body,
                400,
                {"success": False, "error": "Message size exceeds Message_MaxAllowedSize [error-message-size-exceeded]"},
            )
        message["msg"] = body["text"]
        if "customFields" in body:
            message["customFields"] = body["customFields"]  # replaced, not merged, as Rocket.Chat does
        message["editedAt"] = message["_updatedAt"] = _now()
        message["editedBy"] = {"_id": self.user_id, "username": self.username}
        return self._answer(request, "chat.update", body, 200, {"message": message, "success": True})

    async def _react(self, request: Request) -> JSONResponse:
        body, refusal = await self._admit(request, "chat.react")
        if refusal is not None:
            return refusal
        message = self.messages.get(body.get("messageId", "")) if isinstance(body, dict) else None
        if message is None:
            return self._answer(
                request, "chat.react", body, 400, {"success": False, "error": 'The required "messageId" param is missing or unknown.'}
            )
        emoji = ":" + str(body.get("emoji") or body.get("reaction") or "").strip(":") + ":"
        reacted = self.username in message.get("reactions", {}).get(emoji, {}).get("usernames", [])
        should = body.get("shouldReact", not reacted)  # without it, a second call takes the reaction back
        usernames = [u for u in message.get("reactions", {}).get(emoji, {}).get("usernames", []) if u != self.username]
        if should:
            usernames.append(self.username)
        message.setdefault("reactions", {})[emoji] = {"usernames": usernames}
        if not usernames:
            del message["reactions"][emoji]
        return self._answer(request, "chat.react", body, 200, {"success": True})

    async def _get_message(self, request: Request) -> JSONResponse:
        _, refusal = await self._admit(request, "chat.getMessage")
        if refusal is not None:
            return refusal
        message = self.messages.get(request.query_params.get("msgId", ""))
        if message is None:  # Rocket.Chat's bare failure(): no error text
            return self._answer(request, "chat.getMessage", None, 400, {"success": False})
        if message["rid"] in self.hidden_rooms:
            error = {"success": False, "error": "Not allowed [error-not-allowed]", "errorType": "error-not-allowed"}
            return self._answer(request, "chat.getMessage", None, 400, error)
        return self._answer(request, "chat.getMessage", None, 200, {"message": message, "success": True})

    async def _delete(self, request: Request) -> JSONResponse:
        body, refusal = await self._admit(request, "chat.delete")
        if refusal is not None:
            return refusal
        if not isinstance(body, dict) or not body.get("roomId") or not body.get("msgId"):
            return self._answer(request, "chat.delete", body, 400, {"success": False, "error": "must have required property 'msgId'"})
        message = self.messages.get(body["msgId"])
        if message is None:
            error = f'No message found with the id of "{body["msgId"]}".'
            return self._answer(request, "chat.delete", body, 400, {"success": False, "error": error})
        if message["rid"] != body["roomId"]:
            error = "The room id provided does not match where the message is from."
            return self._answer(request, "chat.delete", body, 400, {"success": False, "error": error})
        del self.messages[body["msgId"]]
        self.deletes[body["msgId"]] += 1
        gone = {"_id": message["_id"], "rid": message["rid"], "u": message["u"]}
        answer = {"_id": message["_id"], "ts": str(int(time.time() * 1000)), "message": gone, "success": True}
        return self._answer(request, "chat.delete", body, 200, answer)

    async def _im_create(self, request: Request) -> JSONResponse:
        body, refusal = await self._admit(request, "im.create")
        if refusal is not None:
            return refusal
        username = body.get("username") if isinstance(body, dict) else None
        if not isinstance(username, str) or not username:
            return self._answer(request, "im.create", body, 400, {"success": False, "error": "must have required property 'username'"})
        known = {**self.users, self.username: self.user_id}
        if username not in known:
            error = {"success": False, "error": "Invalid user [error-invalid-user]", "errorType": "error-invalid-user"}
            return self._answer(request, "im.create", body, 400, error)
        # A direct room's id is its members' ids, sorted and joined, so asking again finds it.
        uids = sorted({self.user_id, known[username]})
        room_id = "".join(uids)
        if room_id not in self.direct_rooms:
            self.direct_rooms[room_id] = {"rid": room_id, "t": "d", "usernames": sorted({self.username, username}), "uids": uids}
            self.rooms_created[room_id] += 1
        room = {**self.direct_rooms[room_id], "_id": room_id}
        return self._answer(request, "im.create", body, 200, {"room": room, "success": True})

    async def _users_info(self, request: Request) -> JSONResponse:
        _, refusal = await self._admit(request, "users.info")
        if refusal is not None:
            return refusal
        known = {**self.users, self.username: self.user_id}
        by_id = {uid: name for name, uid in known.items()}
        # Rocket.Chat takes userId first, then username; an empty one counts as absent.
        user_id, username = request.query_params.get("userId"), request.query_params.get("username")
        if user_id:
            username = by_id.get(user_id)
        elif username:
            user_id = known.get(username)
        else:
            return self._answer(request, "users.info", None, 400, {"success": False, "error": "Invalid search query."})
        if user_id is None or username is None or username not in known:
            return self._answer(request, "users.info", None, 400, {"success": False, "error": "User not found."})
        user = {
            "_id": user_id,
            "username": username,
            "name": username.title(),
            "type": "bot" if user_id == self.user_id else "user",
            "status": "offline",
            "active": True,
            "roles": ["bot"] if user_id == self.user_id else ["user"],
            "utcOffset": 0,
        }
        return self._answer(request, "users.info", None, 200, {"user": user, "success": True})

    # -- what every endpoint does first ----------------------------------------------------

    async def _admit(self, request: Request, endpoint: str) -> tuple[Any, JSONResponse | None]:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                return None, self._answer(request, endpoint, None, 400, {"success": False, "error": "Invalid JSON"})
        if request.headers.get("x-user-id") != self.user_id or request.headers.get("x-auth-token") != self.auth_token:
            return body, self._answer(request, endpoint, body, 401, {"status": "error", "message": "You must be logged in to do this."})
        with self._lock:
            planned = self.failures.get(endpoint)
            if planned:
                status = planned.pop(0)
                return body, self._answer(request, endpoint, body, status, {"success": False, "error": "planned failure"})
            throttled = self._throttle(endpoint)
        if throttled is not None:
            headers = {"Retry-After": str(max(1, round(throttled))), **self._rate_headers(endpoint)}
            error = {"success": False, "error": "Error, too many requests. Please slow down. [error-too-many-requests]"}
            return body, self._answer(request, endpoint, body, 429, error, headers)
        return body, None

    def _throttle(self, endpoint: str) -> float | None:
        """Seconds until the window of ``endpoint`` ends if this call is over the limit, else None."""
        if self.rate_limit is None:
            return None
        now = time.monotonic()
        start, used = self._windows.get(endpoint, (now, 0))
        if now - start >= self.rate_window_s:
            start, used = now, 0
        if used >= self.rate_limit:
            return self.rate_window_s - (now - start)
        self._windows[endpoint] = (start, used + 1)
        return None

    def _rate_headers(self, endpoint: str) -> dict[str, str]:
        start, used = self._windows.get(endpoint, (time.monotonic(), 0))
        reset_ms = int((time.time() + self.rate_window_s - (time.monotonic() - start)) * 1000)
        return {
            "X-RateLimit-Limit": str(self.rate_limit),
            "X-RateLimit-Remaining": str(max(0, (self.rate_limit or 0) - used)),
            "X-RateLimit-Reset": str(reset_ms),
        }

    def _answer(
        self, request: Request, endpoint: str, body: Any, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
    ) -> JSONResponse:
        call = Call(request.method, endpoint, body, dict(request.query_params), status)
        self.calls.append(call)
        if self.journal is not None:
            with self.journal.open("a", encoding="utf-8") as out:
                out.write(
                    json.dumps({"method": call.method, "endpoint": endpoint, "body": body, "params": call.params, "status": status}) + "\n"
                )
        return JSONResponse(payload, status_code=status, headers=headers)

    # -- serving ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on a free loopback port in a thread; yields the base URL."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
        thread.start()
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the fake Rocket.Chat did not start within 10 s")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=10)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
