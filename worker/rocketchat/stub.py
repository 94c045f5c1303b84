"""A stand-in for Rocket.Chat's REST API, beside the real client, for handler authors' tests.

It answers the calls the user, room and message readers make (``users.info``,
``rooms.info``, ``channels.members``/``groups.members``/``im.members``, ``chat.getMessage``)
from users, rooms and messages given in the contract's JSON shape, as an httpx transport:
no socket, no server. Give it to ``worker.testing.Harness(app, rocketchat=stub)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import httpx
from pydantic import SecretStr

from worker.config import RocketChatSettings

_MEMBERS = ("channels.members", "groups.members", "im.members", "rooms.membersOrderedByRole")


class RocketChatStub:
    """Rocket.Chat's REST API over given users, rooms and messages.

    Args:
        users: users as the contract has them (``{"id", "username", "name", ...}``).
        rooms: rooms (``{"id", "slugifiedName", "type", ...}``).
        messages: messages as IMessage JSON (``worker.testing.message()`` builds them).
        members: user ids by room id.
        app_user: the worker's own user (the app user); added to ``users``.

    Attributes:
        calls: every call received, as ``"endpoint?query"``, in order.
        settings: a ``rocketchat`` section naming the app user.
        transport: the httpx transport that answers the calls.

    Example::

        stub = RocketChatStub(users=[{"id": "u1", "username": "bob"}], app_user={"id": "bot", "username": "alerts"})
        async with Harness(MyApp, rocketchat=stub) as harness:
            ...

    """

    def __init__(
        self,
        *,
        users: Iterable[Mapping[str, Any]] = (),
        rooms: Iterable[Mapping[str, Any]] = (),
        messages: Iterable[Mapping[str, Any]] = (),
        members: Mapping[str, Sequence[str]] | None = None,
        app_user: Mapping[str, Any] | None = None,
    ) -> None:
        app = dict(app_user or {"id": "app-user", "username": "app.bot", "type": "app"})
        self.users = {u["id"]: dict(u) for u in [app, *users]}
        self.rooms = {r["id"]: dict(r) for r in rooms}
        self.messages = {m["id"]: dict(m) for m in messages}
        self.members = {room: list(ids) for room, ids in (members or {}).items()}
        self.calls: list[str] = []
        self.settings = RocketChatSettings(url="http://rocketchat.stub", user_id=app["id"], auth_token=SecretStr("stub-token"))
        self.transport = httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        endpoint = request.url.path.removeprefix("/api/v1/")
        query = dict(request.url.params)
        self.calls.append(f"{endpoint}?{request.url.query.decode()}")
        if endpoint == "users.info":
            user = self.users.get(query.get("userId", "")) or _find(self.users, "username", query.get("username"))
            return _found("user", _rest_user(user) if user else None, "User not found.")
        if endpoint == "rooms.info":
            room = self.rooms.get(query.get("roomId", "")) or _find(self.rooms, "slugifiedName", query.get("roomName"))
            return _found("room", _rest_room(room) if room else None, "error-room-not-found")
        if endpoint == "chat.getMessage":
            found = self.messages.get(query.get("msgId", ""))
            return _found("message", _rest_message(found) if found else None, "error-not-allowed")
        if endpoint in _MEMBERS:
            return self._members(query)
        return httpx.Response(404, json={"success": False, "error": f"the stub does not answer {endpoint}"})

    def _members(self, query: dict[str, str]) -> httpx.Response:
        ids = self.members.get(query.get("roomId", ""), [])
        offset, count = int(query.get("offset", 0)), int(query.get("count", 50))
        page = [_rest_user(self.users.get(i, {"id": i})) for i in ids[offset : offset + count]]
        return httpx.Response(200, json={"members": page, "count": len(page), "offset": offset, "total": len(ids), "success": True})


def _find(items: Mapping[str, dict[str, Any]], field: str, value: str | None) -> dict[str, Any] | None:
    return next((item for item in items.values() if value is not None and item.get(field) == value), None)


def _found(key: str, document: dict[str, Any] | None, error: str) -> httpx.Response:
    if document is None:
        return httpx.Response(400, json={"success": False, "error": error})
    return httpx.Response(200, json={key: document, "success": True})


def _rest_user(user: Mapping[str, Any]) -> dict[str, Any]:
    return {"_id": user["id"], **{k: v for k, v in user.items() if k != "id"}}


def _rest_room(room: Mapping[str, Any]) -> dict[str, Any]:
    rest = {"_id": room["id"], "name": room.get("slugifiedName"), "t": room.get("type")}
    return {**rest, **{k: v for k, v in room.items() if k not in ("id", "slugifiedName", "type")}}


def _rest_message(message: Mapping[str, Any]) -> dict[str, Any]:
    sender = message.get("sender", {})
    rest = {
        "_id": message["id"],
        "rid": message.get("room", {}).get("id"),
        "msg": message.get("text"),
        "u": {"_id": sender.get("id"), "username": sender.get("username"), "name": sender.get("name")},
        "ts": message.get("createdAt"),
        "_updatedAt": message.get("updatedAt"),
        "tmid": message.get("threadId"),
        "t": message.get("type"),
    }
    known = {"id", "room", "sender", "text", "createdAt", "updatedAt", "threadId", "type"}
    return {k: v for k, v in {**rest, **{k: v for k, v in message.items() if k not in known}}.items() if v is not None}
