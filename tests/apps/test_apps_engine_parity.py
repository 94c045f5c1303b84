"""Apps-Engine parity: user, room and message readers, notifier, deleter, blocks, updated/deleted events."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.support import ROOT
from worker import App, Association, AssociationModel, Message, User
from worker.apps.readers import Directory, Readers
from worker.config import RocketChatSettings
from worker.errors import RocketChatError, RocketChatUnavailable
from worker.events import MessageDeleteContext
from worker.rocketchat.client import RocketChatClient
from worker.rocketchat.stub import RocketChatStub
from worker.testing import Harness, assert_idempotent, cloud_event, message

USERS = [{"id": "u-bob", "username": "bob", "name": "Bob", "roles": ["user"]}] + [
    {"id": f"u-{n}", "username": f"user{n}"} for n in range(150)
]
APP_USER = {"id": "bot-id", "username": "alerts.bot", "name": "Alerts", "type": "bot"}
ROOMS = [{"id": "r-ops", "slugifiedName": "ops", "type": "p", "fname": "Ops"}]
OLD = {
    "id": "m-old",
    "room": {"id": "r-ops"},
    "sender": {"id": "u-bob", "username": "bob", "name": "Bob"},
    "text": "earlier",
    "createdAt": "2026-01-01T08:00:00.000Z",
    "threadId": "m-root",
}


@pytest.fixture
def fake() -> RocketChatStub:
    return RocketChatStub(users=USERS, rooms=ROOMS, messages=[OLD], members={"r-ops": [f"u-{n}" for n in range(150)]}, app_user=APP_USER)


@pytest.fixture
async def directory(fake: RocketChatStub) -> Any:
    found = Directory.over(fake)
    yield found
    await found.aclose()


def _event_message(**fields: Any) -> Message:
    return Message.model_validate(message("hello", room="general", sender="alice", **fields))


class TestUserReader:
    async def test_the_sender_is_answered_from_the_event_without_rocket_chat(self) -> None:
        """No rocketchat section: the sender still reads, by id and by username."""
        users = Directory().for_message(_event_message()).users
        assert (await users.get_by_id("id-alice")).username == "alice"  # type: ignore[union-attr]
        assert (await users.get_by_username("alice")).id == "id-alice"  # type: ignore[union-attr]

    async def test_the_app_user_from_rocketchat_app_user_id_alone(self) -> None:
        """rocketchat.app_user_id without credentials: get_app_user (and get_by_id of it) answer that id, with no REST client."""
        directory = Directory.from_settings(RocketChatSettings(app_user_id="id-alerts"))
        assert directory.client is None
        users = directory.for_message(_event_message()).users
        app_user = await users.get_app_user()
        assert app_user is not None
        assert (app_user.id, app_user.username, app_user.type) == ("id-alerts", None, "app")
        assert await users.get_by_id("id-alerts") == app_user
        with pytest.raises(RocketChatUnavailable, match=r"get_by_username\('bob'\)"):
            await users.get_by_username("bob")  # any other user still needs Rocket.Chat

    async def test_the_app_user_id_wins_over_half_set_credentials(self) -> None:
        """A user_id without auth_token is no connection, and rocketchat.app_user_id still names the app user."""
        half = RocketChatSettings(user_id="bot", app_user_id="id-alerts")
        users = Directory.from_settings(half).for_message(_event_message()).users
        assert (await users.get_app_user()) == User(id="id-alerts", type="app")

    async def test_the_app_user_is_the_configured_user(self, directory: Directory, fake: RocketChatStub) -> None:
        """get_app_user reads users.info for rocketchat.user_id."""
        app_user = await directory.for_message(_event_message()).users.get_app_user()
        assert (app_user.id, app_user.username) == ("bot-id", "alerts.bot")  # type: ignore[union-attr]
        assert fake.calls == ["users.info?userId=bot-id"]

    async def test_rest_answers_are_cached_across_runs(self, directory: Directory, fake: RocketChatStub) -> None:
        """A second run asking for the same user makes no second REST call; by id after by username neither."""
        first = await directory.for_message(_event_message()).users.get_by_username("bob")
        second = await directory.for_message(_event_message()).users.get_by_username("bob")
        by_id = await directory.for_message(_event_message()).users.get_by_id("u-bob")
        assert first == second == by_id
        assert first is not None
        assert first.model_extra == {"roles": ["user"]}
        assert fake.calls == ["users.info?username=bob"]

    async def test_an_unknown_user_is_none(self, directory: Directory) -> None:
        """Rocket.Chat's 400 "User not found." is None, as the Apps-Engine's undefined."""
        assert await directory.for_message(_event_message()).users.get_by_id("nobody") is None

    async def test_a_server_error_is_raised_and_retriable(self, fake: RocketChatStub) -> None:
        """A 503 is not "not found": the handler's run fails and is retried."""
        failing = Directory(
            RocketChatClient(fake.settings, transport=httpx.MockTransport(lambda r: httpx.Response(503, json={"error": "busy"}))),
            app_user_id="bot-id",
        )
        with pytest.raises(RocketChatError) as raised:
            await failing.for_message(_event_message()).users.get_by_id("u-bob")
        assert (raised.value.status, raised.value.retriable) == (503, True)
        await failing.aclose()


# Every reader call that the event cannot answer, made with no Rocket.Chat connection.
WITHOUT_ROCKET_CHAT: list[tuple[str, Callable[[Readers], Awaitable[object]]]] = [
    ("read.get_user_reader().get_app_user()", lambda chat: chat.users.get_app_user()),
    ("read.get_user_reader().get_by_id('u-bob')", lambda chat: chat.users.get_by_id("u-bob")),
    ("read.get_user_reader().get_by_username('bob')", lambda chat: chat.users.get_by_username("bob")),
    ("read.get_room_reader().get_by_id('r-ops')", lambda chat: chat.rooms.get_by_id("r-ops")),
    ("read.get_room_reader().get_by_name('ops')", lambda chat: chat.rooms.get_by_name("ops")),
    ("read.get_room_reader().get_members('r-ops')", lambda chat: chat.rooms.get_members("r-ops")),
    ("read.get_room_reader().get_members('general')", lambda chat: chat.rooms.get_members("general")),
    ("read.get_message_reader().get_by_id('m-old')", lambda chat: chat.messages.get_by_id("m-old")),
]


class TestWithoutRocketChat:
    @pytest.mark.parametrize(("call", "read"), WITHOUT_ROCKET_CHAT, ids=[call for call, _ in WITHOUT_ROCKET_CHAT])
    async def test_each_reader_raises_one_clear_error(self, call: str, read: Callable[[Readers], Awaitable[object]]) -> None:
        """The default config (no rocketchat section): RocketChatUnavailable naming the call, the cause and the keys that fix it."""
        chat = Directory.from_settings(RocketChatSettings()).for_message(_event_message())
        with pytest.raises(RocketChatUnavailable) as raised:
            await read(chat)
        text = str(raised.value)
        assert text.startswith(f"{call} needs Rocket.Chat's REST API, and no Rocket.Chat connection is configured: ")
        for fix in ("rocketchat.url", "rocketchat.user_id", "rocketchat.auth_token", "RocketChatStub"):
            assert fix in text
        assert raised.value.retriable is False

    async def test_the_app_users_error_names_its_own_fixes(self) -> None:
        """get_app_user alone can also be answered by rocketchat.app_user_id, or Harness(app_user_id=...) in tests."""
        with pytest.raises(RocketChatUnavailable) as raised:
            await Directory().for_message(None).users.get_app_user()
        assert "rocketchat.app_user_id" in str(raised.value)
        assert "Harness(app_user_id=...)" in str(raised.value)

    async def test_the_event_still_answers_itself(self) -> None:
        """What the event carries needs no connection: the sender, the room, the message."""
        own = _event_message()
        chat = Directory.from_settings(RocketChatSettings()).for_message(own)
        assert (await chat.users.get_by_username("alice")) == own.sender
        assert (await chat.rooms.get_by_id("general")) == own.room
        assert (await chat.messages.get_by_id(own.id)) is own


class TestRoomAndMessageReaders:
    async def test_the_events_room_needs_no_rest(self, directory: Directory, fake: RocketChatStub) -> None:
        """get_by_id and get_by_name of the event's room answer from the event."""
        rooms = directory.for_message(_event_message()).rooms
        assert (await rooms.get_by_id("general")).type == "c"  # type: ignore[union-attr]
        assert (await rooms.get_by_name("general")).id == "general"  # type: ignore[union-attr]
        assert fake.calls == []

    async def test_another_room_by_name_through_rooms_info(self, directory: Directory) -> None:
        """rooms.info maps _id, name, t to id, slugifiedName, type; other fields are kept."""
        room = await directory.for_message(_event_message()).rooms.get_by_name("ops")
        assert room is not None
        assert (room.id, room.slugified_name, room.type) == ("r-ops", "ops", "p")
        assert room.model_extra == {"fname": "Ops"}

    async def test_members_are_read_page_by_page(self, directory: Directory, fake: RocketChatStub) -> None:
        """A private room's 150 members come through groups.members in pages of 100."""
        members = await directory.for_message(_event_message()).rooms.get_members("r-ops")
        assert [m.username for m in members] == [f"user{n}" for n in range(150)]
        assert [c.split("?")[0] for c in fake.calls] == ["rooms.info", "groups.members", "groups.members"]

    async def test_the_events_message_and_another_message(self, directory: Directory, fake: RocketChatStub) -> None:
        """The event's own message answers itself; another comes from chat.getMessage in the contract's shape."""
        own = _event_message()
        messages = directory.for_message(own).messages
        assert await messages.get_by_id(own.id) is own
        other = await messages.get_by_id("m-old")
        assert other is not None
        assert (other.text, other.room.id, other.sender.username, other.thread_id) == ("earlier", "r-ops", "bob", "m-root")
        assert fake.calls == ["chat.getMessage?msgId=m-old"]


# -- commands ----------------------------------------------------------------------------------


class Alerts(App):
    """Notifies the sender and the room, adds blocks to a new message and the edited one, deletes the event's message."""

    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        notifier = modify.get_notifier()
        await notifier.notify_user(message.sender, notifier.get_message_builder().set_text("seen").add_blocks({"type": "divider"}))
        await notifier.notify_room(message.room, notifier.get_message_builder().set_text("all of you"))
        creator = modify.get_creator()
        await creator.finish(creator.start_message().set_room(message.room).set_text("new").set_blocks([{"type": "section"}]))
        updater = modify.get_updater()
        await updater.finish(updater.message(message.id).add_blocks([{"type": "divider"}]))
        await modify.get_deleter().delete_message(message.id, message.sender)


class TestCommands:
    async def test_each_accessor_stages_one_command_with_its_type_and_data(self) -> None:
        """notify_user, notify_room, blocks on create and update, delete_message: one command each, in order."""
        async with Harness(Alerts) as harness:
            await harness.deliver([message("hi", room="r1", sender="bob", message_id="m1")])
            commands = await harness.commands()
        assert [(c.type, c.key) for c in commands] == [
            ("chat.rocket.user.notify", "r1"),
            ("chat.rocket.room.notify", "r1"),
            ("chat.rocket.message.create", "r1"),
            ("chat.rocket.message.update", "r1"),
            ("chat.rocket.message.delete", "r1"),
        ]
        notify_user, notify_room, create, update, delete = (c.data for c in commands)
        assert notify_user == {"userId": "id-bob", "username": "bob", "text": "seen", "blocks": [{"type": "divider"}]}
        assert notify_room == {"roomId": "r1", "text": "all of you"}
        assert create["blocks"] == [{"type": "section"}]
        assert update["blocks"] == [{"type": "divider"}]
        assert delete == {"messageId": "m1", "roomId": "r1", "user": "id-bob"}

    async def test_the_new_commands_are_staged_exactly_once(self) -> None:
        """Redelivered and repeated runs leave the same five commands, with the same ids."""
        await assert_idempotent(Alerts, [message("hi", room="r1"), message("ho", room="r2")])

    async def test_deleting_another_message_by_id_asks_for_the_message(self) -> None:
        """Its room is unknown: the error says to read the Message first."""

        class DeletesOther(App):
            async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                await modify.get_deleter().delete_message("someone-elses")

        async with Harness(DeletesOther) as harness:
            with pytest.raises(AssertionError, match=r"pass the Message \(await read.get_message_reader\(\)\.get_by_id\(id\)\)"):
                await harness.deliver([message("hi")])


# -- events ------------------------------------------------------------------------------------

SEEN = Association(AssociationModel.MISC, "seen")


def _typed(kind: str, data: dict[str, Any], event_id: str) -> dict[str, Any]:
    return {**cloud_event(data), "type": f"chat.rocket.message.{kind}", "id": event_id}


class Recorder(App):
    """Keeps one record per event it sees: which interface, which message, who deleted."""

    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        await persistence.update(f"sent:{message.id}", {"text": message.text}, upsert=True)

    async def execute_post_message_updated(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        await persistence.update(f"updated:{message.id}", {"text": message.text}, upsert=True)

    async def execute_post_message_deleted(  # type: ignore[no-untyped-def]
        self, message, read, http, persistence, modify, context: MessageDeleteContext
    ):
        await persistence.update(f"deleted:{message.id}", {"by": context.user.username}, upsert=True)


class SentOnly(App):
    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        await persistence.update(f"sent:{message.id}", {}, upsert=True)


class TestMessageEvents:
    async def test_updated_and_deleted_events_reach_their_methods(self) -> None:
        """Sent, edited, deleted: each reaches its execute_ method; deletedBy is the context's user."""
        sent = message("v1", message_id="m1")
        edited = {**sent, "text": "v2", "editedAt": "2026-01-01T10:00:00.000Z"}
        deleted = {**sent, "deletedBy": {"id": "id-carol", "username": "carol"}}
        async with Harness(Recorder) as harness:
            delivery = await harness.deliver(
                [sent, _typed("updated", edited, "m1:updated:1767261600000"), _typed("deleted", deleted, "m1:deleted")]
            )
            data = {r.id: r.data for r in await harness.records()}
        assert delivery.processed == 3
        assert data == {"sent:m1": {"text": "v1"}, "updated:m1": {"text": "v2"}, "deleted:m1": {"by": "carol"}}

    async def test_an_app_that_takes_no_updates_never_sees_one(self) -> None:
        """An edit reaches no app that lacks execute_post_message_updated: skipped, nothing written."""
        async with Harness(SentOnly) as harness:
            delivery = await harness.deliver([_typed("updated", message("v2", message_id="m1"), "m1:updated:1")])
            assert (delivery.processed, delivery.skipped) == (0, 1)
            assert await harness.records() == []

    async def test_without_deleted_by_the_sender_is_who_deleted(self) -> None:
        """An event without deletedBy: the context's user is the message's sender."""
        async with Harness(Recorder) as harness:
            await harness.deliver([_typed("deleted", message("x", message_id="m9", sender="dave"), "m9:deleted")])
            assert [r.data for r in await harness.records()] == [{"by": "dave"}]


class TestConfiguration:
    async def test_a_configured_section_gives_a_rest_client_and_the_app_user(self) -> None:
        """rocketchat.user_id/auth_token set: the directory calls REST as that user, the app user; unset: none."""
        configured = Directory.from_settings(RocketChatSettings(url="http://rc.test", user_id="bot", auth_token=SecretStr("t")))
        assert configured.client is not None
        assert configured.app_user_id == "bot"
        await configured.aclose()
        guard = RocketChatSettings(url="http://rc.test", user_id="bot", auth_token=SecretStr("t"), app_user_id="alerts")
        assert Directory.from_settings(guard).app_user_id == "alerts"
        await configured.aclose()
        assert Directory.from_settings(RocketChatSettings()).client is None


class TestTheBridgesEvents:
    async def test_the_rocket_chat_apps_sent_updated_and_deleted_fixtures_reach_their_methods(self) -> None:
        """The events rocketchat-app/ produces (its test fixtures) decode and reach each execute_ method."""
        fixtures = ROOT / "rocketchat-app" / "test" / "fixtures"
        events = [json.loads((fixtures / f"{kind}.json").read_text(encoding="utf-8")) for kind in ("sent", "updated", "deleted")]
        async with Harness(Recorder) as harness:
            delivery = await harness.deliver(events)
            data = {r.id: r.data for r in await harness.records()}
        assert delivery.processed == 3
        assert data == {
            "sent:msg-0001": {"text": events[0]["data"]["text"]},
            "updated:msg-0001": {"text": "hello @bob, edited"},
            "deleted:msg-0001": {"by": "alice"},
        }
