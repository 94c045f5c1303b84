"""Each command type carried to the fake Rocket.Chat: idempotent, merging, refusing what Rocket.Chat refuses."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.rocketchat import FakeRocketChat
from worker.apps.modify import CREATE_MESSAGE, UPDATE_MESSAGE
from worker.bridge.commands import ID_ALPHABET, ID_LENGTH, REACT_MESSAGE, Command, apply, message_id_for, parse
from worker.config import RocketChatSettings
from worker.errors import DecodeError, RocketChatError
from worker.rocketchat.client import RocketChatClient
from worker.rocketchat.names import apps_attachment, rest_attachment


def _client(fake: FakeRocketChat) -> RocketChatClient:
    settings = RocketChatSettings.model_validate({"url": "http://rc.test", "user_id": fake.user_id, "auth_token": fake.auth_token})
    return RocketChatClient(settings, transport=httpx.ASGITransport(app=fake.app))


def _command(kind: str, data: dict[str, Any], command_id: str = "https://chat.example/m1/mentions/0") -> Command:
    return parse(orjson.dumps({"specversion": "1.0", "type": kind, "source": "rc-apps-worker/mentions", "id": command_id, "data": data}))


class TestMessageId:
    def test_is_deterministic_and_shaped_like_rocket_chat_ids(self) -> None:
        """The same command id always gives the same 17-character id of Rocket.Chat's alphabet."""
        first = message_id_for("src/ev/app/0")
        assert first == message_id_for("src/ev/app/0")
        assert first != message_id_for("src/ev/app/1")
        assert len(first) == ID_LENGTH
        assert set(first) <= set(ID_ALPHABET)


class TestCreate:
    async def test_applied_twice_inserts_once(self) -> None:
        """A repeated create finds its message: one insert, in the right room, with its fields."""
        fake = FakeRocketChat()
        command = _command(CREATE_MESSAGE, {"roomId": "GENERAL", "text": "hi", "customFields": {"k": 1}, "threadId": "t1"})
        async with _client(fake) as client:
            assert await apply(client, command) == "created"
            assert await apply(client, command) == "created"
        message_id = message_id_for(command.id)
        assert fake.inserts[message_id] == 1
        stored = fake.messages[message_id]
        assert (stored["rid"], stored["msg"], stored["tmid"], stored["customFields"]) == ("GENERAL", "hi", "t1", {"k": 1})
        assert "ts" not in fake.calls[0].body["message"]

    async def test_text_over_the_size_limit_is_refused_for_good(self) -> None:
        """Rocket.Chat refuses text over Message_MaxAllowedSize: a permanent error, not retried."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await apply(client, _command(CREATE_MESSAGE, {"roomId": "GENERAL", "text": "x" * 5001}))
        assert caught.value.status == 400
        assert not caught.value.retriable

    async def test_attachments_go_out_in_rest_names(self) -> None:
        """Apps-Engine attachments are sent flat, as the REST API names them."""
        fake = FakeRocketChat()
        attachment = {"title": {"value": "T", "link": "https://x"}, "imageUrl": "https://i", "text": "body"}
        async with _client(fake) as client:
            await apply(client, _command(CREATE_MESSAGE, {"roomId": "GENERAL", "text": "", "attachments": [attachment]}))
        sent = fake.calls[0].body["message"]["attachments"][0]
        assert sent == {"title": "T", "title_link": "https://x", "image_url": "https://i", "text": "body"}


class TestUpdate:
    async def test_custom_fields_are_merged_so_others_survive(self) -> None:
        """An update adds its fields to those the message has; chat.update's replace drops nothing."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello", customFields={"theirs": "kept"})
        command = _command(UPDATE_MESSAGE, {"messageId": "m1", "customFields": {"mentions": ["alice"]}, "replaceCustomFields": False})
        async with _client(fake) as client:
            await apply(client, command)
            await apply(client, command)
        stored = fake.messages["m1"]
        assert stored["customFields"] == {"theirs": "kept", "mentions": ["alice"]}
        assert stored["msg"] == "hello"  # no text in the command: the text is kept

    async def test_replace_custom_fields_replaces(self) -> None:
        """replaceCustomFields asks for exactly the given fields."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello", customFields={"theirs": "gone"})
        async with _client(fake) as client:
            await apply(
                client, _command(UPDATE_MESSAGE, {"messageId": "m1", "text": "new", "customFields": {"a": 1}, "replaceCustomFields": True})
            )
        assert (fake.messages["m1"]["customFields"], fake.messages["m1"]["msg"]) == ({"a": 1}, "new")

    async def test_unknown_message_is_refused_for_good(self) -> None:
        """Updating a message the server does not have is a permanent error."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await apply(client, _command(UPDATE_MESSAGE, {"messageId": "nope", "customFields": {}}))
        assert not caught.value.retriable


class TestReact:
    async def test_should_react_makes_a_repeat_harmless(self) -> None:
        """With shouldReact explicit, applying a reaction twice leaves one reaction (the toggle would take it back)."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello")
        command = _command(REACT_MESSAGE, {"messageId": "m1", "emoji": "thumbsup"})
        async with _client(fake) as client:
            await apply(client, command)
            await apply(client, command)
        assert fake.messages["m1"]["reactions"] == {":thumbsup:": {"usernames": [fake.username]}}
        assert all(call.body["shouldReact"] is True for call in fake.calls)


class TestRefusedCommands:
    def test_not_json(self) -> None:
        """A value that is not JSON is no command."""
        with pytest.raises(DecodeError, match="not JSON"):
            parse(b"{")

    async def test_unknown_type(self) -> None:
        """A type the applier does not know is refused with the types it knows."""
        async with _client(FakeRocketChat()) as client:
            with pytest.raises(DecodeError, match="unknown"):
                await apply(client, _command("chat.rocket.message.pin", {}))

    async def test_missing_field(self) -> None:
        """A create without a room says which field is missing."""
        async with _client(FakeRocketChat()) as client:
            with pytest.raises(DecodeError, match="roomId"):
                await apply(client, _command(CREATE_MESSAGE, {"text": "x"}))


class TestAttachmentNames:
    def test_round_trip(self) -> None:
        """Apps-Engine -> REST -> Apps-Engine gives the attachment back."""
        attachment = {"title": {"value": "T", "link": "https://x"}, "author": {"name": "A"}, "thumbnailUrl": "https://t", "color": "red"}
        assert apps_attachment(rest_attachment(attachment)) == attachment
