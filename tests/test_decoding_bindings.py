"""Records as the CloudEvents Kafka binding and its Python SDK make them, and the Apps-Engine IMessage names."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from cloudevents.v1.http import CloudEvent
from cloudevents.v1.kafka import KafkaMessage, to_binary, to_structured

from worker.errors import DecodeError
from worker.events import RawRecord, decode

MESSAGE: dict[str, Any] = {
    "id": "Gj7bZyTpwcmxB2DAT",
    "room": {"id": "GENERAL", "slugifiedName": "general", "type": "c", "displayName": "general"},
    "sender": {"id": "rocket.cat", "username": "rocket.cat", "type": "bot"},
    "text": "hello @alice",
    "createdAt": "2024-05-01T10:00:00.000Z",
    "editedAt": "2024-05-01T10:01:00.000Z",
    "editor": {"id": "u1", "username": "alice"},
    "attachments": [{"title": {"value": "A file"}, "description": "text"}],
}
ATTRIBUTES = {"type": "chat.rocket.message.sent", "source": "https://chat.example.org", "id": "Gj7bZyTpwcmxB2DAT"}


def _from_sdk(message: KafkaMessage) -> RawRecord:
    headers = tuple((name, value) for name, value in message.headers.items())
    key = message.key.encode() if isinstance(message.key, str) else message.key
    return RawRecord("t", 0, 0, 0, key, message.value, headers)


def _sdk_event(data: Any = MESSAGE, **attributes: str) -> CloudEvent:
    return CloudEvent({**ATTRIBUTES, "datacontenttype": "application/json", **attributes}, data)


class TestCloudEventsSdk:
    def test_structured_record_of_the_sdk_decodes(self) -> None:
        """to_structured moves datacontenttype into content-type (application/json), with no ce_* headers: still structured."""
        made = to_structured(_sdk_event(), key_mapper=lambda _event: "GENERAL")
        assert made.headers["content-type"] == b"application/json"
        assert not [name for name in made.headers if name.startswith("ce_")]
        event = decode(_from_sdk(made))
        assert event.is_post_message_sent
        assert event.message is not None
        assert event.message.id == MESSAGE["id"]

    def test_binary_record_of_the_sdk_decodes(self) -> None:
        """to_binary puts the attributes in ce_* headers and the message in the value."""
        made = to_binary(_sdk_event(), key_mapper=lambda _event: "GENERAL")
        assert made.headers["ce_specversion"] == b"1.0"
        event = decode(_from_sdk(made))
        assert event.message is not None
        assert event.message.room.id == "GENERAL"

    def test_bytes_data_of_the_sdk_arrives_as_data_base64(self) -> None:
        """The SDK writes bytes data as data_base64; the decoder reads the message from it."""
        made = to_structured(CloudEvent(ATTRIBUTES, orjson.dumps(MESSAGE)))
        assert b"data_base64" in made.value
        event = decode(_from_sdk(made))
        assert event.message is not None
        assert event.message.text == "hello @alice"


def _record(value: dict[str, Any] | bytes, headers: tuple[tuple[str, bytes], ...] = ()) -> RawRecord:
    encoded = value if isinstance(value, bytes) else orjson.dumps(value)
    return RawRecord("t", 0, 0, 0, b"GENERAL", encoded, headers)


STRUCTURED = {"specversion": "1.0", **ATTRIBUTES, "data": MESSAGE}


class TestContentType:
    def test_structured_content_type_wins_over_ce_headers(self) -> None:
        """A value announced as application/cloudevents+json is the whole event, even beside ce_* headers."""
        headers = (("content-type", b"application/cloudevents+json; charset=utf-8"), ("ce_specversion", b"1.0"), ("ce_id", b"other"))
        event = decode(_record(STRUCTURED, headers))
        assert event.id == ATTRIBUTES["id"]
        assert event.message is not None

    @pytest.mark.parametrize("content_type", [b"Application/CloudEvents+JSON", b"APPLICATION/JSON"])
    def test_content_type_is_compared_case_insensitively(self, content_type: bytes) -> None:
        """Media types are case-insensitive."""
        assert decode(_record(STRUCTURED, (("content-type", content_type),))).message is not None

    def test_plain_json_without_specversion_is_still_refused(self) -> None:
        """application/json is accepted only for a value that is a whole CloudEvent."""
        with pytest.raises(DecodeError, match="no specversion"):
            decode(_record(MESSAGE, (("content-type", b"application/json"),)))


class TestDataBase64:
    def test_data_base64_carries_the_message(self) -> None:
        """data_base64 is base64 of the message's JSON."""
        value = {"specversion": "1.0", **ATTRIBUTES, "data_base64": base64.b64encode(orjson.dumps(MESSAGE)).decode()}
        event = decode(_record(value))
        assert event.message is not None
        assert event.message.editor is not None
        assert event.message.editor.username == "alice"

    @pytest.mark.parametrize(
        ("extra", "reason"),
        [
            ({"data_base64": "%%%"}, "not valid base64"),
            ({"data_base64": 12}, "not a base64 string"),
            ({"data_base64": "e30=", "data": MESSAGE}, "both set"),
        ],
    )
    def test_bad_data_base64_is_refused(self, extra: dict[str, Any], reason: str) -> None:
        """Broken or doubled data is refused with the reason."""
        with pytest.raises(DecodeError, match=reason):
            decode(_record({"specversion": "1.0", **ATTRIBUTES, **extra}))


class TestMessageNames:
    def test_apps_engine_fields_are_typed(self) -> None:
        """editor, editedAt, sender.type and room.displayName follow the Apps-Engine IMessage names."""
        event = decode(_record(STRUCTURED))
        message = event.message
        assert message is not None
        assert message.sender.type == "bot"
        assert message.edited_at is not None
        assert message.room.display_name == "general"
        assert message.attachments == MESSAGE["attachments"]

    def test_sender_type_defaults_to_user(self) -> None:
        """A sender without type is a person."""
        data = {**MESSAGE, "sender": {"id": "u1"}}
        message = decode(_record({**STRUCTURED, "data": data})).message
        assert message is not None
        assert message.sender.type == "user"

    def test_unknown_sender_type_is_refused(self) -> None:
        """Only user, bot and app are sender types."""
        data = {**MESSAGE, "sender": {"id": "u1", "type": "robot"}}
        with pytest.raises(DecodeError, match=r"data\.sender\.type"):
            decode(_record({**STRUCTURED, "data": data}))

    def test_raw_rocket_chat_names_are_not_guessed(self) -> None:
        """A raw Rocket.Chat message (msg, rid, u, ts) is not the contract: ingest converts it, the worker refuses it."""
        raw = {"_id": "x", "rid": "GENERAL", "msg": "hi", "u": {"_id": "u1"}, "ts": "2024-05-01T10:00:00.000Z"}
        with pytest.raises(DecodeError, match="data"):
            decode(_record({**STRUCTURED, "data": raw}))
