"""What one command from ``kafka.commands_topic`` does to Rocket.Chat, idempotently by construction.

A create sends ``chat.sendMessage`` with an ``_id`` derived from the command id: a repeat
finds the message there and inserts nothing (confirmed with ``chat.getMessage``). An update
reads the message, merges the command's custom fields into the ones it has and writes the
result with ``chat.update``: writing the same merge twice changes nothing more. A reaction
names ``shouldReact`` explicitly, so a repeat does not take it back. A delete that finds the
message gone (``chat.getMessage`` has none) counts as done. A notification is a message from
the worker's user, in the room or in the user's direct room (``im.create``, which answers the
room that exists), sent like a create under an ``_id`` derived from the command id; a user
notification that carries only the user's id finds the username with ``users.info`` first
(kept in the readers' bounded cache, so a busy user costs one lookup per cache lifetime).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.apps.modify import CREATE_MESSAGE, DELETE_MESSAGE, NOTIFY_ROOM, NOTIFY_USER, UPDATE_MESSAGE
from worker.apps.readers import Directory
from worker.errors import DecodeError, RocketChatError
from worker.rocketchat.client import RocketChatClient
from worker.rocketchat.names import rest_attachment

#: A reaction command (``data``: messageId, emoji, shouldReact); no handler API stages it yet.
REACT_MESSAGE = "chat.rocket.message.react"

# Rocket.Chat's Random.id() alphabet and length (no 0, 1, I, O, U, V, l, o: nothing to misread).
ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz"
ID_LENGTH = 17


def message_id_for(command_id: str) -> str:
    """The Rocket.Chat message id a create command gets: the same for every try of the command."""
    number = int.from_bytes(hashlib.sha256(command_id.encode()).digest(), "big")
    chars = []
    for _ in range(ID_LENGTH):
        number, index = divmod(number, len(ID_ALPHABET))
        chars.append(ID_ALPHABET[index])
    return "".join(chars)


class _Data(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)


class CreateData(_Data):
    """``data`` of a create command, as worker.modify stages it."""

    room_id: str = Field(alias="roomId", min_length=1)
    text: str = ""
    thread_id: str | None = Field(None, alias="threadId")
    custom_fields: dict[str, Any] = Field(default_factory=dict, alias="customFields")
    attachments: list[dict[str, Any]] = Field(default_factory=list)


class UpdateData(_Data):
    """``data`` of an update command, as worker.modify stages it."""

    message_id: str = Field(alias="messageId", min_length=1)
    text: str | None = None
    custom_fields: dict[str, Any] = Field(default_factory=dict, alias="customFields")
    replace_custom_fields: bool = Field(False, alias="replaceCustomFields")
    attachments: list[dict[str, Any]] = Field(default_factory=list)


class ReactData(_Data):
    """``data`` of a reaction command."""

    message_id: str = Field(alias="messageId", min_length=1)
    emoji: str = Field(min_length=1)
    should_react: bool = Field(True, alias="shouldReact")


class DeleteData(_Data):
    """``data`` of a delete command; its ``user`` is not carried: the worker's user deletes."""

    message_id: str = Field(alias="messageId", min_length=1)
    room_id: str = Field(alias="roomId", min_length=1)


class NotifyRoomData(_Data):
    """``data`` of a room notification: a message from the worker's user in the room."""

    room_id: str = Field(alias="roomId", min_length=1)
    text: str = ""
    attachments: list[dict[str, Any]] = Field(default_factory=list)


class NotifyUserData(_Data):
    """``data`` of a user notification: a direct message from the worker's user, found by username (else by user id)."""

    username: str | None = Field(None, min_length=1, description="im.create finds the direct room by username")
    user_id: str | None = Field(None, alias="userId", min_length=1, description="looked up with users.info when no username is given")
    text: str = ""
    attachments: list[dict[str, Any]] = Field(default_factory=list)


class Command(BaseModel):
    """A command as the worker's outbox publishes it: a structured CloudEvent."""

    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str
    type: str
    source: str
    id: str = Field(min_length=1)
    data: dict[str, Any]


def parse(value: bytes | None) -> Command:
    """The command in a record's value.

    Raises:
        DecodeError: not a command; the reason goes to the dead letter.

    """
    try:
        return Command.model_validate(orjson.loads(value or b""))
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"command is not JSON: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DecodeError(f"command {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


async def apply(client: RocketChatClient, command: Command, users: Directory | None = None) -> str:
    """Carry out ``command``; returns what it did, for the log.

    ``users`` answers the usernames of user ids (one per applier, so its cache lasts); without
    it, one over ``client`` is made for this command.

    Raises:
        DecodeError: the command's data is not what its type needs, or the type is unknown.
        RocketChatError: Rocket.Chat refused or did not answer; ``retriable`` says whether to try again.

    """
    applier = _APPLIERS.get(command.type)
    if applier is None:
        raise DecodeError(f"command type {command.type!r} is unknown; rc-worker apply carries {', '.join(_APPLIERS)}")
    try:
        return await applier(client, command, users or Directory(client, app_user_id=client.settings.user_id))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DecodeError(f"{command.type} data.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None


async def _create(client: RocketChatClient, command: Command, _users: Directory) -> str:
    data = CreateData.model_validate(command.data)
    message = _message(data.room_id, data.text, data.attachments)
    if data.thread_id:
        message["tmid"] = data.thread_id
    if data.custom_fields:
        message["customFields"] = data.custom_fields
    return "created" if await _send_once(client, command.id, message) else "created_before"


def _message(room_id: str, text: str, attachments: list[dict[str, Any]]) -> dict[str, Any]:
    # No "ts": Rocket.Chat stamps the time itself.
    message: dict[str, Any] = {"rid": room_id, "msg": text}
    if attachments:
        message["attachments"] = [rest_attachment(a) for a in attachments]
    return message


async def _send_once(client: RocketChatClient, command_id: str, message: dict[str, Any]) -> bool:
    """Send ``message`` under the id derived from ``command_id``; False if an earlier try had sent it."""
    message_id = message["_id"] = message_id_for(command_id)
    try:
        answer = await client.call("POST", "chat.sendMessage", json={"message": message})
    except RocketChatError as exc:
        if exc.retriable or not await _exists(client, message_id, message["rid"]):
            raise
        return False  # a server that refuses a known _id instead of answering it
    sent = answer.get("message") or {}
    if sent.get("_id") != message_id:
        raise RocketChatError(200, f"chat.sendMessage answered message {sent.get('_id')!r}, not the {message_id!r} sent")
    return True


async def _get_message(client: RocketChatClient, message_id: str) -> dict[str, Any] | None:
    """The message, or None when Rocket.Chat answers that it has none (a bare 400 from its failure())."""
    try:
        found = await client.call("GET", "chat.getMessage", params={"msgId": message_id})
    except RocketChatError as exc:
        # Throttled, down, or not allowed to read the room (also a 400): no answer about the message.
        if exc.status != 400 or "error-not-allowed" in exc.error:
            raise
        return None
    return found.get("message") or None


async def _exists(client: RocketChatClient, message_id: str, room_id: str) -> bool:
    try:
        found = await _get_message(client, message_id)
    except RocketChatError as exc:
        if exc.retriable:
            raise
        return False
    return bool(found and found.get("rid") == room_id)


async def _update(client: RocketChatClient, command: Command, _users: Directory) -> str:
    data = UpdateData.model_validate(command.data)
    current = (await client.call("GET", "chat.getMessage", params={"msgId": data.message_id})).get("message") or {}
    room_id = current.get("rid")
    if not room_id:
        raise RocketChatError(404, f"chat.getMessage: message {data.message_id} has no room")
    fields = dict(data.custom_fields) if data.replace_custom_fields else {**(current.get("customFields") or {}), **data.custom_fields}
    body: dict[str, Any] = {
        "roomId": room_id,
        "msgId": data.message_id,
        "text": data.text if data.text is not None else current.get("msg", ""),
    }
    # chat.update replaces customFields whole: the merge above keeps what others set.
    if fields or current.get("customFields"):
        body["customFields"] = fields
    if data.attachments:
        body["attachments"] = [rest_attachment(a) for a in data.attachments]
    await client.call("POST", "chat.update", json=body)
    return "updated"


async def _react(client: RocketChatClient, command: Command, _users: Directory) -> str:
    data = ReactData.model_validate(command.data)
    emoji = data.emoji if data.emoji.startswith(":") else f":{data.emoji.strip(':')}:"
    await client.call("POST", "chat.react", json={"messageId": data.message_id, "emoji": emoji, "shouldReact": data.should_react})
    return "reacted" if data.should_react else "unreacted"


async def _delete(client: RocketChatClient, command: Command, _users: Directory) -> str:
    data = DeleteData.model_validate(command.data)
    try:
        await client.call("POST", "chat.delete", json={"roomId": data.room_id, "msgId": data.message_id})
    except RocketChatError as exc:
        # chat.delete answers a missing message with a 400 like its other refusals: ask whether it is gone.
        if exc.status != 400 or not await _gone(client, data.message_id):
            raise
        return "deleted_before"
    return "deleted"


async def _gone(client: RocketChatClient, message_id: str) -> bool:
    try:
        return await _get_message(client, message_id) is None
    except RocketChatError as exc:
        if exc.retriable:
            raise
        return False  # not allowed to read it: no proof it is gone


async def _notify_room(client: RocketChatClient, command: Command, _users: Directory) -> str:
    data = NotifyRoomData.model_validate(command.data)
    sent = await _send_once(client, command.id, _message(data.room_id, data.text, data.attachments))
    return "notified_room" if sent else "notified_room_before"


async def _notify_user(client: RocketChatClient, command: Command, users: Directory) -> str:
    data = NotifyUserData.model_validate(command.data)
    username = data.username or await _username_of(users, data.user_id)
    # im.create answers the direct room that exists, so a repeat opens nothing new.
    room = (await client.call("POST", "im.create", json={"username": username})).get("room") or {}
    room_id = room.get("rid") or room.get("_id")
    if not room_id:
        raise RocketChatError(200, f"im.create answered no room for user {username!r}")
    sent = await _send_once(client, command.id, _message(room_id, data.text, data.attachments))
    return "notified_user" if sent else "notified_user_before"


async def _username_of(users: Directory, user_id: str | None) -> str:
    """The username ``im.create`` needs, of the user ``user_id`` (``users.info``, cached)."""
    if user_id is None:
        raise DecodeError(f"{NOTIFY_USER} data has neither username nor userId: it names nobody to notify")
    user = await users.user("userId", user_id, f"{NOTIFY_USER} of user id {user_id}")
    if user is None or not user.username:
        # Permanent: users.info knows no such user (or one without a username); retrying finds none either.
        raise RocketChatError(400, f"users.info: no user with id {user_id!r} (or it has no username) to notify")
    return user.username


_APPLIERS: dict[str, Callable[[RocketChatClient, Command, Directory], Awaitable[str]]] = {
    CREATE_MESSAGE: _create,
    UPDATE_MESSAGE: _update,
    REACT_MESSAGE: _react,
    DELETE_MESSAGE: _delete,
    NOTIFY_ROOM: _notify_room,
    NOTIFY_USER: _notify_user,
}
