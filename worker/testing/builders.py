"""Building the events a handler test delivers: messages, CloudEvents, records of a contract JSON-lines file."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from worker import constants
from worker.config import ProcessingSettings
from worker.errors import DecodeError
from worker.events import Message, RawRecord, decode
from worker.tools.dump import FileRecord, read_records_file

#: CloudEvents ``source`` of the events that :func:`cloud_event` wraps messages in.
SOURCE = "//worker.testing"


#: The topic, consumer group and output topics the harness pretends to use.
TOPIC = "worker.testing"


GROUP = "worker.testing"


DEAD_LETTER_TOPIC = f"{TOPIC}.dlq"


COMMANDS_TOPIC = constants.DEFAULT_COMMANDS_TOPIC


#: Quick retries, so that tests of failing handlers stay fast; conflicts are retried for long,
#: as concurrent copies over one SQLite file conflict often.
TEST_PROCESSING = ProcessingSettings(
    conflict_max_attempts=200, handler_max_attempts=3, backoff_initial_ms=1, backoff_max_ms=20, handler_timeout_s=30
)


Events = Iterable[Mapping[str, Any] | Message] | os.PathLike[str]


"""What :meth:`Harness.deliver` and the checks accept: messages as dicts (IMessage JSON, or whole
CloudEvents with ``specversion``) or :class:`~worker.Message` objects, or the path of a contract
JSON-lines file (one Kafka record a line, as ``rc-worker load`` reads)."""


_numbers = itertools.count(1)


_BASE_TIME = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)


def message(
    text: str | None = "",
    *,
    room: str = "general",
    sender: str = "alice",
    message_id: str | None = None,
    created_at: datetime | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An IMessage as JSON, with defaults for everything a test does not care about.

    Args:
        text: the message text (None leaves it out, as for attachment-only messages).
        room: the room id (also its slugified name); rooms are of type ``c``.
        sender: the sender's username; its id is ``id-<username>``.
        message_id: the message id; by default a new one (``msg-1``, ``msg-2``, ...). The
            event id is derived from it, so two messages with one id are one event.
        created_at: an aware datetime; by default one second after the previous message's.
        **fields: more IMessage fields, under the contract's JSON names (``threadId``,
            ``customFields``, ``attachments``, or any field the contract does not list) or
            the Python names of :class:`~worker.Message` (``thread_id``, ``custom_fields``,
            ``updated_at``), which are written under the JSON names.

    """
    number = next(_numbers)
    data: dict[str, Any] = {
        "id": message_id or f"msg-{number}",
        "room": {"id": room, "slugifiedName": room, "type": "c"},
        "sender": {"id": f"id-{sender}", "username": sender, "name": sender.title()},
        "createdAt": _timestamp(created_at or _BASE_TIME + timedelta(seconds=number)),
    }
    if text is not None:
        data["text"] = text
    data.update({_JSON_NAMES.get(name, name): value for name, value in fields.items()})
    return data


# Message's Python names and the contract's JSON names they stand for (thread_id: threadId).
_JSON_NAMES = {name: info.alias for name, info in Message.model_fields.items() if info.alias}


def cloud_event(
    data: Mapping[str, Any], *, event_id: str | None = None, source: str = SOURCE, event_type: str = constants.POST_MESSAGE_SENT
) -> dict[str, Any]:
    """Wrap IMessage JSON in a CloudEvent; its id is ``evt-<message id>`` by default.

    ``event_type`` is ``chat.rocket.message.sent`` by default; ``chat.rocket.message.updated``
    and ``chat.rocket.message.deleted`` make an edit or a deletion of the message (give their
    ids as Rocket.Chat's bridge does: ``<message id>:updated:<ms>``, ``<message id>:deleted``).
    """
    return {
        "specversion": constants.CLOUDEVENTS_SPECVERSION,
        "type": event_type,
        "source": source,
        "id": event_id or f"evt-{data.get('id', uuid.uuid4().hex)}",
        "datacontenttype": "application/json",
        "data": dict(data),
    }


def file_records(events: Events) -> list[FileRecord]:
    """The events as file records, from a list of messages or a JSON-lines file."""
    if isinstance(events, (str, bytes)):
        raise TypeError("events must be a list of messages or a pathlib.Path of a JSON-lines file, not a string")
    if isinstance(events, os.PathLike):
        return read_records_file(Path(events))  # the same parser as `rc-worker load`
    return [_item(n, event) for n, event in enumerate(events)]


def _item(number: int, event: Mapping[str, Any] | Message) -> FileRecord:
    if isinstance(event, Message):
        envelope = cloud_event(event.to_json())
    elif isinstance(event, Mapping):
        envelope = dict(event) if "specversion" in event else cloud_event(event)
    else:
        raise TypeError(f"event {number} is a {type(event).__name__}; give dicts (IMessage JSON or CloudEvents) or worker.Message objects")
    room = envelope.get("data", {}).get("room", {}) if isinstance(envelope.get("data"), Mapping) else {}
    key = room.get("id") if isinstance(room, Mapping) else None
    item = FileRecord(
        key.encode() if isinstance(key, str) else None,
        orjson.dumps(envelope),
        (("content-type", constants.STRUCTURED_CONTENT_TYPE.encode()),),
    )
    try:
        decode(RawRecord(TOPIC, 0, number, 0, item.key, item.value, item.headers))
    except DecodeError as exc:
        raise ValueError(f"event {number} is not a contract event: {exc.reason}; worker.testing.message() builds valid ones") from None
    return item


def _timestamp(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("created_at must be an aware datetime, e.g. datetime(2026, 1, 1, tzinfo=UTC)")
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
