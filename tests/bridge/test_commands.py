"""Each command type carried to the fake Rocket.Chat: idempotent, merging, refusing what Rocket.Chat refuses."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.rocketchat import FakeRocketChat
from worker.apps.modify import CREATE_MESSAGE, DELETE_MESSAGE, NOTIFY_ROOM, NOTIFY_USER, UPDATE_MESSAGE
from worker.apps.readers import Directory
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


class TestDelete:
    async def test_applied_twice_deletes_once(self) -> None:
        """The first try deletes; the repeat finds the message gone and counts it as done."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello")
        command = _command(DELETE_MESSAGE, {"messageId": "m1", "roomId": "GENERAL", "user": None})
        async with _client(fake) as client:
            assert await apply(client, command) == "deleted"
            assert await apply(client, command) == "deleted_before"
        assert "m1" not in fake.messages
        assert fake.deletes == {"m1": 1}
        assert fake.calls[0].body == {"roomId": "GENERAL", "msgId": "m1"}

    async def test_unknown_message_counts_as_deleted(self) -> None:
        """A message the server never had (or lost) is already what the command asks for."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            assert await apply(client, _command(DELETE_MESSAGE, {"messageId": "nope", "roomId": "GENERAL"})) == "deleted_before"
        assert fake.count("chat.delete", 400) == fake.count("chat.getMessage", 400) == 1

    async def test_message_of_another_room_is_refused_for_good(self) -> None:
        """chat.delete refuses a room that is not the message's: the message stays and the error is permanent."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello")
        async with _client(fake) as client:
            with pytest.raises(RocketChatError, match="does not match") as caught:
                await apply(client, _command(DELETE_MESSAGE, {"messageId": "m1", "roomId": "OTHER"}))
        assert (caught.value.status, caught.value.retriable) == (400, False)
        assert "m1" in fake.messages

    @pytest.mark.parametrize("status", [429, 502])
    async def test_throttled_or_failing_server_is_retriable_and_the_retry_deletes_once(self, status: int) -> None:
        """A 429 or 5xx is retriable and asks nothing more; the next try deletes."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello")
        fake.fail_next("chat.delete", status)
        command = _command(DELETE_MESSAGE, {"messageId": "m1", "roomId": "GENERAL"})
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await apply(client, command)
            assert caught.value.retriable
            assert fake.count("chat.getMessage") == 0
            assert await apply(client, command) == "deleted"
        assert fake.deletes == {"m1": 1}

    async def test_refused_credentials_are_not_taken_for_a_deleted_message(self) -> None:
        """A 401 is a permanent error of its own, not a sign that the message is gone."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "hello")
        fake.fail_next("chat.delete", 401)
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await apply(client, _command(DELETE_MESSAGE, {"messageId": "m1", "roomId": "GENERAL"}))
        assert (caught.value.status, caught.value.retriable) == (401, False)
        assert "m1" in fake.messages

    async def test_a_message_the_worker_may_not_read_is_not_taken_for_deleted(self) -> None:
        """chat.getMessage's "not allowed" (a 400 too) is no proof the message is gone: the refusal stands."""
        fake = FakeRocketChat(hidden_rooms={"SECRET"})
        fake.add_message("m1", "SECRET", "hello")
        fake.fail_next("chat.delete", 400)
        async with _client(fake) as client:
            with pytest.raises(RocketChatError, match=r"chat\.delete: planned failure") as caught:
                await apply(client, _command(DELETE_MESSAGE, {"messageId": "m1", "roomId": "SECRET"}))
        assert not caught.value.retriable
        assert fake.count("chat.getMessage", 400) == 1
        assert "m1" in fake.messages


class TestNotifyRoom:
    async def test_applied_twice_posts_once_in_the_room(self) -> None:
        """A room notification is one message from the worker's user under the command's id."""
        fake = FakeRocketChat()
        attachment = {"title": {"value": "T"}, "text": "body"}
        command = _command(NOTIFY_ROOM, {"roomId": "GENERAL", "text": "heads up", "attachments": [attachment]})
        async with _client(fake) as client:
            assert await apply(client, command) == "notified_room"
            assert await apply(client, command) == "notified_room"  # the server answers the known _id
        message_id = message_id_for(command.id)
        assert fake.inserts == {message_id: 1}
        stored = fake.messages[message_id]
        assert (stored["rid"], stored["msg"], stored["u"]["_id"]) == ("GENERAL", "heads up", fake.user_id)
        assert stored["attachments"] == [{"title": "T", "text": "body"}]

    async def test_too_long_is_refused_for_good_and_5xx_retried(self) -> None:
        """Text over the size limit is permanent; a 503 is retriable and the retry posts once."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await apply(client, _command(NOTIFY_ROOM, {"roomId": "GENERAL", "text": "x" * 5001}))
            assert not caught.value.retriable
            fake.fail_next("chat.sendMessage", 503)
            command = _command(NOTIFY_ROOM, {"roomId": "GENERAL", "text": "ok"}, "src/ev/app/1")
            with pytest.raises(RocketChatError) as caught:
                await apply(client, command)
            assert caught.value.retriable
            await apply(client, command)
        assert fake.inserts == {message_id_for("src/ev/app/1"): 1}


class TestNotifyUser:
    async def test_applied_twice_opens_one_direct_room_and_posts_once(self) -> None:
        """im.create answers the same direct room again; the message goes there once."""
        fake = FakeRocketChat()
        command = _command(NOTIFY_USER, {"userId": "u-1", "username": "alice", "text": "psst"})
        async with _client(fake) as client:
            assert await apply(client, command) == "notified_user"
            assert await apply(client, command) == "notified_user"
        [room_id] = fake.direct_rooms
        assert fake.rooms_created == {room_id: 1}
        assert fake.direct_rooms[room_id]["usernames"] == sorted(["alice", fake.username])
        message_id = message_id_for(command.id)
        assert fake.inserts == {message_id: 1}
        assert (fake.messages[message_id]["rid"], fake.messages[message_id]["msg"]) == (room_id, "psst")
        assert fake.count("im.create") == 2

    async def test_unknown_user_is_refused_for_good(self) -> None:
        """im.create refuses a username it does not know: permanent, and nothing is posted."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            with pytest.raises(RocketChatError, match="Invalid user") as caught:
                await apply(client, _command(NOTIFY_USER, {"userId": "u-9", "username": "nobody", "text": "psst"}))
        assert (caught.value.status, caught.value.retriable) == (400, False)
        assert fake.count("chat.sendMessage") == 0

    @pytest.mark.parametrize("status", [429, 500])
    @pytest.mark.parametrize("endpoint", ["im.create", "users.info"])
    async def test_throttled_or_failing_lookups_are_retriable(self, endpoint: str, status: int) -> None:
        """A 429 or 5xx from users.info or im.create is retriable, nothing is posted meanwhile; the retry posts once."""
        fake = FakeRocketChat()
        fake.fail_next(endpoint, status)
        command = _command(NOTIFY_USER, {"userId": "u-1", "text": "psst"})
        async with _client(fake) as client:
            with pytest.raises(RocketChatError) as caught:
                await apply(client, command)
            assert caught.value.retriable
            assert fake.count("chat.sendMessage") == 0
            await apply(client, command)
        assert fake.inserts == {message_id_for(command.id): 1}

    async def test_a_user_id_alone_is_looked_up_with_users_info(self) -> None:
        """Without a username, users.info (userId) gives it; the same directory asks once for two commands."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            users = Directory(client)
            assert await apply(client, _command(NOTIFY_USER, {"userId": "u-1", "text": "one"}, "src/ev/app/1"), users) == "notified_user"
            assert await apply(client, _command(NOTIFY_USER, {"userId": "u-1", "text": "two"}, "src/ev/app/2"), users) == "notified_user"
        [room_id] = fake.direct_rooms
        assert fake.direct_rooms[room_id]["usernames"] == sorted(["alice", fake.username])
        assert [c.params for c in fake.calls if c.endpoint == "users.info"] == [{"userId": "u-1"}]
        assert fake.inserts == {message_id_for("src/ev/app/1"): 1, message_id_for("src/ev/app/2"): 1}

    async def test_an_unknown_user_id_is_refused_for_good(self) -> None:
        """users.info knows no such user: permanent, and neither im.create nor chat.sendMessage is called."""
        fake = FakeRocketChat()
        async with _client(fake) as client:
            with pytest.raises(RocketChatError, match="no user with id 'u-9'") as caught:
                await apply(client, _command(NOTIFY_USER, {"userId": "u-9", "text": "psst"}))
        assert not caught.value.retriable
        assert fake.count("users.info", 400) == 1
        assert fake.count("im.create") == fake.count("chat.sendMessage") == 0

    async def test_without_username_or_user_id_is_refused_as_data(self) -> None:
        """A notification that names nobody is refused as data: the reason names both fields."""
        async with _client(FakeRocketChat()) as client:
            with pytest.raises(DecodeError, match="neither username nor userId"):
                await apply(client, _command(NOTIFY_USER, {"text": "psst"}))


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
