"""Decode one Kafka record into a typed event: CloudEvents 1.0 around an Apps-Engine IMessage.

Both modes of the CloudEvents Kafka binding are accepted (structured: the value is the whole
event; binary: ``ce_*`` headers and the value is the message). Anything that is not the
contract raises DecodeError with a reason short enough for a dead-letter header.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from worker import constants, limits
from worker.errors import DecodeError


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A Kafka record as the worker sees it, whichever client fetched it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def header(self, name: str) -> bytes | None:
        """The last value of header ``name``, or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found


def _must_be_text(value: Any) -> Any:
    # The contract's timestamps are RFC 3339 strings; pydantic alone would take numbers too.
    if not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string")
    return value


Timestamp = Annotated[AwareDatetime, BeforeValidator(_must_be_text)]
Text = Annotated[str, Field(strict=True)]
Id = Annotated[str, Field(strict=True, min_length=1)]


class _Model(BaseModel):
    # Fields the contract does not list are kept (model_extra) and passed to handlers untouched.
    # Validators are built on the first event: check-config and handlers import these models
    # (through the App contract) but never validate one.
    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, defer_build=True)


class Room(_Model):
    """The room a message was sent in (IRoom, as far as the event carries it)."""

    id: Id
    slugified_name: Text | None = Field(None, alias="slugifiedName")
    display_name: Text | None = Field(None, alias="displayName")
    type: Literal["c", "p", "d", "l"] | None = None


class User(_Model):
    """The sender of a message (IUser, as far as the event carries it)."""

    id: Id
    username: Text | None = None
    name: Text | None = None
    # Apps-Engine's UserType; absent means a person. The loop guard reads the sender's id.
    type: Literal["user", "bot", "app"] = "user"


class Editor(_Model):
    """Who last edited a message (IMessage.editor)."""

    id: Id
    username: Text | None = None


class Message(_Model):
    """An Apps-Engine IMessage, with Python names; unknown fields are in ``model_extra``."""

    id: Id
    room: Room
    sender: User
    text: Text | None = None
    created_at: Timestamp = Field(alias="createdAt")
    updated_at: Timestamp | None = Field(None, alias="updatedAt")
    edited_at: Timestamp | None = Field(None, alias="editedAt")
    editor: Editor | None = None
    thread_id: Text | None = Field(None, alias="threadId")
    custom_fields: dict[str, Any] | None = Field(None, alias="customFields")
    attachments: list[dict[str, Any]] | None = None
    type: Text | None = None

    @property
    def is_system_message(self) -> bool:
        """True for system messages (user joined...), which are not PostMessageSent."""
        return self.type is not None

    def to_json(self) -> dict[str, Any]:
        """The message in the contract's JSON shape, unknown fields included."""
        # Unset, not None: a field the event gave as null (an unknown one included) is kept
        # as the contract asks, and only what the event never had is left out.
        return self.model_dump(by_alias=True, exclude_unset=True, mode="json")


@dataclass(frozen=True, slots=True)
class MessageDeleteContext:
    """The context of a PostMessageDeleted event (the Apps-Engine's ``IMessageDeleteContext``).

    Attributes:
        message: the message that was deleted.
        user: who deleted it: the event's ``deletedBy`` user if it carries one, else the
            message's sender.

    """

    message: Message
    user: User


#: The handler interface of each message event type: ``<interface>`` names the App methods
#: ``check_<interface>`` and ``execute_<interface>``.
INTERFACES = {
    constants.POST_MESSAGE_SENT: "post_message_sent",
    constants.POST_MESSAGE_UPDATED: "post_message_updated",
    constants.POST_MESSAGE_DELETED: "post_message_deleted",
}


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded CloudEvent; ``message`` is set for the message events (sent, updated, deleted)."""

    source: str
    id: str
    type: str
    time: datetime | None
    message: Message | None
    record: RawRecord

    @property
    def interface(self) -> str | None:
        """The handler interface this event is for (``"post_message_sent"``...), or None.

        None for a type no handler interface takes, and for system messages, which (as in
        Rocket.Chat) are not PostMessageSent/Updated/Deleted.
        """
        if self.message is None or self.message.is_system_message:
            return None
        return INTERFACES.get(self.type)

    @property
    def is_post_message_sent(self) -> bool:
        """True when PostMessageSent handlers must see this event."""
        return self.interface == "post_message_sent"

    def delete_context(self) -> MessageDeleteContext:
        """The context of a PostMessageDeleted event."""
        if self.message is None:
            raise TypeError("only message events have a delete context")
        deleted_by = (self.message.model_extra or {}).get("deletedBy")
        try:
            user = User.model_validate(deleted_by) if isinstance(deleted_by, dict) else self.message.sender
        except ValidationError:  # an extension field the contract does not define: never fatal
            user = self.message.sender
        return MessageDeleteContext(self.message, user)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, defer_build=True)

    specversion: Id
    type: Id
    source: Id
    id: Id
    time: Timestamp | None = None
    datacontenttype: Text | None = None


def decode(record: RawRecord) -> Event:
    """Decode a record per the wire contract.

    Raises:
        DecodeError: the record is not a contract event; ``reason`` says why.

    """
    _check_headers(record.headers)
    value = record.value
    if value is None:
        raise DecodeError("value is empty (a tombstone); the contract needs an event")
    if len(value) > constants.MAX_VALUE_BYTES:
        raise DecodeError(f"value is {len(value)} bytes, over the limit of {constants.MAX_VALUE_BYTES}")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"value is not valid UTF-8 (byte {exc.start})") from None
    content_type = _header_text(record, "content-type")
    # Media types are case-insensitive (RFC 9110); the structured mode's wins over ce_* headers.
    structured = content_type is not None and content_type.lower().startswith(constants.STRUCTURED_CONTENT_TYPE_PREFIX)
    if not structured and record.header("ce_specversion") is not None:
        return _decode_binary(record, value)
    if not structured and content_type is not None and not _is_json(content_type):
        raise DecodeError(f"content-type {content_type!r} without ce_* headers is neither structured nor binary CloudEvents")
    document = _parse_json(value)
    if not isinstance(document, dict) or "specversion" not in document:
        if not isinstance(document, dict):
            raise DecodeError(f"value is not a JSON object but a JSON {type(document).__name__}")
        raise DecodeError("value has no specversion: not a CloudEvent")
    # A JSON value with specversion is structured even under a plain JSON content-type: the
    # CloudEvents SDK's to_structured moves datacontenttype (application/json) there.
    envelope = _validate_envelope(document)
    data, has_data = _structured_data(document)
    return _event(envelope.specversion, envelope, data, has_data, record)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _structured_data(document: dict[str, Any]) -> tuple[Any, bool]:
    if "data_base64" not in document:
        return document.get("data"), "data" in document
    if "data" in document:
        raise DecodeError("data and data_base64 are both set; a CloudEvent carries one of them")
    encoded = document["data_base64"]
    if not isinstance(encoded, str):
        raise DecodeError("data_base64 is not a base64 string")
    try:
        return _parse_json(base64.b64decode(encoded, validate=True)), True
    except binascii.Error:
        raise DecodeError("data_base64 is not valid base64") from None


def _decode_binary(record: RawRecord, value: bytes) -> Event:
    attributes: dict[str, Any] = {}
    for name in ("specversion", "type", "source", "id", "time"):
        text = _header_text(record, f"ce_{name}")
        if text is not None:
            attributes[name] = text
    envelope = _validate_envelope(attributes, prefix="ce_")
    return _event(envelope.specversion, envelope, _parse_json(value), True, record)


def _event(specversion: str, envelope: _Envelope, data: Any, has_data: bool, record: RawRecord) -> Event:
    if specversion != constants.CLOUDEVENTS_SPECVERSION:
        raise DecodeError(f"specversion {specversion!r} is not supported; expected '1.0'")
    message = None
    if envelope.type in INTERFACES:
        if not has_data:
            raise DecodeError(f"data is missing: a {envelope.type} event carries the message")
        try:
            message = Message.model_validate(data)
        except ValidationError as exc:
            raise DecodeError(_describe(exc, "data")) from None
    _check_storable(envelope, message)
    return Event(envelope.source, envelope.id, envelope.type, envelope.time, message, record)


def _check_storable(envelope: _Envelope, message: Message | None) -> None:
    """Refuse ids the database could not store, here, as one dead letter, not at commit for the whole batch."""
    checks = [("source", envelope.source, limits.EVENT_SOURCE_MAX), ("id", envelope.id, limits.EVENT_ID_MAX)]
    if message is not None:
        checks += [
            ("data.id", message.id, limits.MESSAGE_REF_ID_MAX),
            ("data.room.id", message.room.id, limits.MESSAGE_REF_ID_MAX),
            ("data.sender.id", message.sender.id, limits.MESSAGE_REF_ID_MAX),
        ]
    for name, value, limit in checks:
        problem = limits.text_problem(value, limit)
        if problem is not None:
            raise DecodeError(f"{name} {problem}")


def _validate_envelope(attributes: dict[str, Any], prefix: str = "") -> _Envelope:
    try:
        return _Envelope.model_validate(attributes)
    except ValidationError as exc:
        raise DecodeError(_describe(exc, prefix.rstrip("_") if prefix else "")) from None


def _check_headers(headers: tuple[tuple[str, bytes], ...]) -> None:
    if len(headers) > constants.MAX_HEADERS:
        raise DecodeError(f"record has {len(headers)} headers, over the limit of {constants.MAX_HEADERS}")
    size = sum(len(name.encode("utf-8", "surrogatepass")) + len(value) for name, value in headers)
    if size > constants.MAX_HEADER_BYTES:
        raise DecodeError(f"headers are {size} bytes, over the limit of {constants.MAX_HEADER_BYTES}")


# A JSON string (escapes included), and the bytes that are not brackets once strings are gone.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")


def _too_deep(value: bytes) -> bool:
    """Whether ``value`` nests arrays and objects more than MAX_JSON_DEPTH levels deep.

    Checked before parsing, in a few passes of C-speed byte operations, so a hostile value
    never builds a deep structure (or a deep recursion in validation) at all.
    """
    if value.count(b"[") + value.count(b"{") <= constants.MAX_JSON_DEPTH:
        return False  # every event we expect: too few brackets to nest that deep
    brackets = _JSON_STRING.sub(b"", value).translate(_SQUARE, _NOT_BRACKETS)
    # Each pass removes the innermost pairs; one left after MAX_JSON_DEPTH passes lies deeper.
    for _ in range(constants.MAX_JSON_DEPTH):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            return False
        brackets = shorter
    return b"[]" in brackets


def _parse_json(value: bytes) -> Any:
    if _too_deep(value):
        raise DecodeError(f"value nests JSON more than {constants.MAX_JSON_DEPTH} levels deep")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"value is not JSON: {exc}") from None


def _header_text(record: RawRecord, name: str) -> str | None:
    raw = record.header(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"header {name} is not valid UTF-8") from None


def _describe(exc: ValidationError, root: str) -> str:
    first = exc.errors()[0]
    location = ".".join(str(part) for part in (root, *first["loc"]) if part != "")
    problem = "is required" if first["type"] == "missing" else first["msg"]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{location}: {problem}{more}"
