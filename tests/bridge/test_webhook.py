"""Outgoing-webhook payloads (after Rocket.Chat's triggerHandler.ts) converted to contract CloudEvents."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from tests.support import FIXTURES
from worker import constants
from worker.bridge import webhook
from worker.errors import DecodeError
from worker.events import Message, RawRecord, decode
from worker.rocketchat.names import imessage_from_raw

ROCKETCHAT = FIXTURES / "rocketchat"


def _fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((ROCKETCHAT / name).read_text())
    return loaded


def _converted(payload: dict[str, Any]) -> dict[str, Any]:
    return webhook.to_cloudevent(webhook.parse(orjson.dumps(payload)))


def _decoded(event: dict[str, Any]) -> Any:
    return decode(RawRecord("t", 0, 0, 0, None, orjson.dumps(event), (("content-type", b"application/cloudevents+json"),)))


class TestMessageSent:
    def test_becomes_a_post_message_sent_the_worker_decodes(self) -> None:
        """A Message Sent post is chat.rocket.message.sent with id = message_id and the Site URL as source."""
        payload = _fixture("webhook-message-sent.json")
        event = _converted(payload)
        assert (event["type"], event["id"], event["source"]) == (constants.POST_MESSAGE_SENT, payload["message_id"], payload["siteUrl"])
        decoded = _decoded(event)
        assert decoded.is_post_message_sent
        message = decoded.message
        assert (message.room.id, message.room.slugified_name, message.sender.username, message.sender.type) == (
            "GENERAL",
            "general",
            "marc.pow",
            "user",
        )
        assert message.text == payload["text"]

    def test_bot_and_thread_are_carried(self) -> None:
        """bot marks the sender a bot; tmid is the thread id."""
        event = _converted({**_fixture("webhook-message-sent.json"), "bot": True, "tmid": "parent1"})
        assert event["data"]["sender"]["type"] == "bot"
        assert event["data"]["threadId"] == "parent1"


class TestEdits:
    def test_edit_is_an_update_with_an_id_of_its_own(self) -> None:
        """isEdited under the same message_id becomes chat.rocket.message.updated, not a second sent."""
        sent = _converted(_fixture("webhook-message-sent.json"))
        edited = _converted(_fixture("webhook-message-edited.json"))
        assert edited["type"] == constants.POST_MESSAGE_UPDATED
        assert edited["id"].startswith(f"{sent['id']}:updated:")
        Message.model_validate(edited["data"])

    def test_a_retried_edit_keeps_its_id_and_another_edit_gets_a_new_one(self) -> None:
        """The same edit delivered twice has one id (the worker drops the repeat); a different edit another."""
        payload = _fixture("webhook-message-edited.json")
        assert _converted(payload)["id"] == _converted(payload)["id"]
        assert _converted({**payload, "text": "again"})["id"] != _converted(payload)["id"]


class TestRawMessage:
    def test_raw_names_are_converted_not_guessed(self) -> None:
        """A payload with the raw document (_id, rid, msg, u, ts, flat attachments) gives an IMessage."""
        event = _converted(_fixture("webhook-file-uploaded.json"))
        data = event["data"]
        assert {"_id", "rid", "msg", "u", "ts"}.isdisjoint(data)
        assert data["attachments"][0]["title"] == {"value": "report.pdf", "link": "/file-upload/f1/report.pdf", "displayDownloadLink": True}
        message = _decoded(event).message
        assert (message.id, message.room.id, message.sender.name, message.text) == (
            "Fu8kLmN3pQ4rS5tUv",
            "GENERAL",
            "Marc Pow",
            "the report @alice",
        )

    def test_rest_message_of_the_docs_converts(self) -> None:
        """The documented chat.getMessage answer converts to an IMessage with editor and editedAt."""
        raw = _fixture("rest-get-message.json")["message"]
        message = Message.model_validate(imessage_from_raw(raw))
        assert message.editor is not None
        assert message.editor.username == "marc.pow"
        assert message.edited_at is not None
        assert message.custom_fields == {"ticket": "T-1"}


class TestRefused:
    @pytest.mark.parametrize(
        ("body", "reason"),
        [(b"{", "not JSON"), (b'{"token": "x"}', "channel_id"), (b'{"token": "x", "channel_id": 5}', "channel_id")],
    )
    def test_bad_payloads_name_the_problem(self, body: bytes, reason: str) -> None:
        """Broken JSON or a missing field is refused with the reason."""
        with pytest.raises(DecodeError, match=reason):
            webhook.parse(body)
