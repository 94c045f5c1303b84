"""What one command from ``kafka.commands_topic`` does to Rocket.Chat, idempotently by construction.

A create sends ``chat.sendMessage`` with an ``_id`` derived from the command id: a repeat
finds the message there and inserts nothing (confirmed with ``chat.getMessage``). An update
reads the message, merges the command's custom fields into the ones it has and writes the
result with ``chat.update``: writing the same merge twice changes nothing more. A reaction
names ``shouldReact`` explicitly, so a repeat does not take it back.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worker.apps.modify import CREATE_MESSAGE, UPDATE_MESSAGE
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


async def apply(client: RocketChatClient, command: Command) -> str:
    """Carry out ``command``; returns what it did, for the log.

    Raises:
        DecodeError: the command's data is not what its type needs, or the type is unknown.
        RocketChatError: Rocket.Chat refused or did not answer; ``retriable`` says whether to try again.

    """
    try:
        if command.type == CREATE_MESSAGE:
            return await _create(client, command.id, CreateData.model_validate(command.data))
        if command.type == UPDATE_MESSAGE:
            return await _update(client, UpdateData.model_validate(command.data))
        if command.type == REACT_MESSAGE:
            return await _react(client, ReactData.model_validate(command.data))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise DecodeError(f"{command.type} data.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    raise DecodeError(
        f"command type {command.type!r} is unknown; rc-worker apply carries {CREATE_MESSAGE}, {UPDATE_MESSAGE}, {REACT_MESSAGE}"
    )


async def _create(client: RocketChatClient, command_id: str, data: CreateData) -> str:
    message_id = message_id_for(command_id)
    # No "ts": Rocket.Chat stamps the time itself.
    message: dict[str, Any] = {"_id": message_id, "rid": data.room_id, "msg": data.text}
    if data.thread_id:
        message["tmid"] = data.thread_id
    if data.custom_fields:
        message["customFields"] = data.custom_fields
    if data.attachments:
        message["attachments"] = [rest_attachment(a) for a in data.attachments]
    try:
        answer = await client.call("POST", "chat.sendMessage", json={"message": message})
    except RocketChatError as exc:
        if exc.retriable or not await _exists(client, message_id, data.room_id):
            raise
        return "created_before"  # a server that refuses a known _id instead of answering it
    sent = answer.get("message") or {}
    if sent.get("_id") != message_id:
        raise RocketChatError(200, f"chat.sendMessage answered message {sent.get('_id')!r}, not the {message_id!r} sent")
    return "created"


async def _exists(client: RocketChatClient, message_id: str, room_id: str) -> bool:
    try:
        found = await client.call("GET", "chat.getMessage", params={"msgId": message_id})
    except RocketChatError as exc:
        if exc.retriable:
            raise
        return False
    return bool((found.get("message") or {}).get("rid") == room_id)


async def _update(client: RocketChatClient, data: UpdateData) -> str:
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


async def _react(client: RocketChatClient, data: ReactData) -> str:
    emoji = data.emoji if data.emoji.startswith(":") else f":{data.emoji.strip(':')}:"
    await client.call("POST", "chat.react", json={"messageId": data.message_id, "emoji": emoji, "shouldReact": data.should_react})
    return "reacted" if data.should_react else "unreacted"
