"""Decoding records per the wire contract: both CloudEvents modes, every invalid class refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tests.support import FIXTURES
from worker.errors import DecodeError
from worker.events import RawRecord, decode


def _record(line: dict[str, Any], offset: int = 0) -> RawRecord:
    value = base64.b64decode(line["value_b64"]) if "value_b64" in line else line["value"].encode()
    headers = tuple((k, v.encode()) for k, v in line["headers"].items())
    key = line["key"].encode() if line.get("key") is not None else None
    return RawRecord("t", 0, offset, 0, key, value, headers)


def _lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines() if line.strip()]


# Each contract "why" and the words our reason must contain, so the DLQ says the same thing.
EXPECTED_REASONS = {
    "not json": "not JSON",
    "not an object": "not a JSON object",
    "missing data": "data is missing",
    "missing message id": "data.id",
    "missing room id": "data.room.id",
    "bad createdAt": "data.createdAt",
    "wrong specversion": "specversion",
    "invalid utf-8": "UTF-8",
}


class TestContractSamples:
    @pytest.mark.parametrize(
        "line",
        _lines("valid.jsonl"),
        ids=lambda line: json.loads(line["value"])["id"] if "specversion" in line["value"] else line["headers"].get("ce_id", "?"),
    )
    def test_every_valid_sample_decodes_to_a_post_message_sent(self, line: dict[str, Any]) -> None:
        """Every valid sample is a PostMessageSent with its room and sender."""
        event = decode(_record(line))
        assert event.is_post_message_sent
        assert event.message is not None
        assert event.message.room.id == line["key"]
        assert event.message.created_at.tzinfo is not None

    @pytest.mark.parametrize("line", _lines("invalid.jsonl"), ids=lambda line: line["why"])
    def test_every_invalid_sample_is_refused_with_its_reason(self, line: dict[str, Any]) -> None:
        """Each invalid class is refused, and the reason names what is wrong."""
        with pytest.raises(DecodeError) as caught:
            decode(_record(line))
        assert EXPECTED_REASONS[line["why"]] in caught.value.reason


class TestModes:
    def test_binary_mode_reads_attributes_from_headers(self) -> None:
        """Binary mode: ce_* headers carry the envelope, the value is the message itself."""
        message = {"id": "m1", "room": {"id": "r1"}, "sender": {"id": "u1"}, "createdAt": "2026-11-29T10:00:00Z"}
        headers = (
            ("ce_specversion", b"1.0"),
            ("ce_type", b"chat.rocket.message.sent"),
            ("ce_source", b"//x"),
            ("ce_id", b"e1"),
            ("content-type", b"application/json"),
        )
        event = decode(RawRecord("t", 0, 0, 0, b"r1", json.dumps(message).encode(), headers))
        assert (event.source, event.id, event.message.id if event.message else None) == ("//x", "e1", "m1")

    def test_structured_mode_without_content_type_is_accepted(self) -> None:
        """A JSON object with specversion and no content-type header is structured mode."""
        value = _lines("valid.jsonl")[0]["value"].encode()
        assert decode(RawRecord("t", 0, 0, 0, None, value)).is_post_message_sent

    def test_unknown_fields_are_kept_for_handlers(self) -> None:
        """Fields the contract does not list reach handlers untouched."""
        envelope = json.loads(_lines("valid.jsonl")[0]["value"])
        envelope["data"]["editedBy"] = {"id": "u9"}
        event = decode(RawRecord("t", 0, 0, 0, None, json.dumps(envelope).encode()))
        assert event.message is not None
        assert event.message.model_extra == {"editedBy": {"id": "u9"}}
        assert event.message.to_json()["editedBy"] == {"id": "u9"}

    def test_unknown_fields_given_as_null_are_kept_too(self) -> None:
        """An unknown field whose value is null survives serialising the message (it used to be dropped)."""
        envelope = json.loads(_lines("valid.jsonl")[0]["value"])
        envelope["data"]["pinned"] = None
        event = decode(RawRecord("t", 0, 0, 0, None, json.dumps(envelope).encode()))
        assert event.message is not None
        serialised = event.message.to_json()
        assert "pinned" in serialised
        assert serialised["pinned"] is None
        assert "updatedAt" not in serialised  # what the event never had stays out

    def test_system_messages_are_not_post_message_sent(self) -> None:
        """A message with `type` set is a system message: decoded, but not for these handlers."""
        envelope = json.loads(_lines("valid.jsonl")[0]["value"])
        envelope["data"]["type"] = "uj"
        assert not decode(RawRecord("t", 0, 0, 0, None, json.dumps(envelope).encode())).is_post_message_sent

    def test_other_event_types_are_decoded_but_skipped(self) -> None:
        """Other CloudEvents types share the topic: valid, with no message for these handlers."""
        envelope = {"specversion": "1.0", "type": "chat.rocket.room.created", "source": "//x", "id": "e2", "data": {"any": 1}}
        event = decode(RawRecord("t", 0, 0, 0, None, json.dumps(envelope).encode()))
        assert event.message is None
        assert not event.is_post_message_sent

    @pytest.mark.parametrize(
        ("value", "headers", "reason"),
        [
            (None, (), "tombstone"),
            (b'{"specversion": "1.0"}', (("content-type", b"text/plain"),), "neither structured nor binary"),
            (b'{"no": "specversion"}', (), "no specversion"),
            (b"x" * 1_000_001, (), "over the limit"),
        ],
        ids=["tombstone", "foreign-content-type", "not-a-cloudevent", "oversized"],
    )
    def test_records_outside_the_contract_are_refused(
        self, value: bytes | None, headers: tuple[tuple[str, bytes], ...], reason: str
    ) -> None:
        """Anything else that is not the contract is refused with a reason."""
        with pytest.raises(DecodeError, match=reason):
            decode(RawRecord("t", 0, 0, 0, None, value, headers))

    def test_numbers_are_not_timestamps(self) -> None:
        """createdAt must be an RFC 3339 string, not a number pydantic would coerce."""
        envelope = json.loads(_lines("valid.jsonl")[0]["value"])
        envelope["data"]["createdAt"] = 1764410400
        with pytest.raises(DecodeError, match=r"data\.createdAt"):
            decode(RawRecord("t", 0, 0, 0, None, json.dumps(envelope).encode()))
