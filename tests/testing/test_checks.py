"""The kit's checks cannot be fooled: every effect it sees is compared, and a failing handler fails them."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from handlers.mentions import Mentions
from handlers.message_count import MessageCount
from worker import App, Association, AssociationModel, DeadLetterNow, IHttp, IModify, IPersistence, IRead, Message
from worker.apps.contract import Read
from worker.apps.http import Http
from worker.apps.readers import Directory
from worker.config import HttpSettings, RocketChatSettings
from worker.errors import RocketChatUnavailable
from worker.plugins import instantiate
from worker.rocketchat.stub import RocketChatStub
from worker.testing import Harness, HttpStub, StubRequest, assert_concurrency_safe, assert_idempotent, message

SEEN_IDS: list[str] = []  # the module-level state under test: never reset between runs
SEEN = Association(AssociationModel.MISC, "seen")


def _events(rooms: int = 3, count: int = 6) -> list[dict[str, Any]]:
    return [message(f"m{n}", room=f"r{n % rooms}") for n in range(count)]


class ModuleListCounter(App):
    """Deliberately wrong: counts the messages it has seen in a module-level list."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        SEEN_IDS.append(message.id)
        await persistence.update_by_association(SEEN, {"seen": len(SEEN_IDS)}, upsert=True)


class ServiceSettings(BaseModel):
    url: str


class Notifies(App):
    """Posts to a service on every message: not idempotent on the other side, and nothing in its state shows it."""

    settings_model = ServiceSettings

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        await http.get(self.settings["url"])  # a read may repeat: not reported
        await http.post(self.settings["url"], json={"text": message.text})


class RandomCommand(App):
    """Deliberately wrong: stages a command whose text is random on every run."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        creator = modify.get_creator()
        builder = creator.start_message().set_room(message.room).set_text(f"ticket {uuid.uuid4().hex[:8]}").set_thread_id(message.id)
        await creator.finish(builder.add_custom_field("source", "random-command").add_custom_field("long", "x" * 200))


class ForgetsAwait(App):
    """Deliberately wrong: the write is never awaited."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        persistence.update_by_association(SEEN, {"seen": 1}, upsert=True)  # type: ignore[unused-coroutine]


class AlwaysRaises(App):
    """Deliberately wrong: fails on every event."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        raise KeyError("customFields")


class RefusesSome(App):
    """Dead-letters messages it can never handle, at once, on purpose; counts the others."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        if message.text == "poison":
            raise DeadLetterNow(f"cannot handle {message.id}")
        room = Association(AssociationModel.ROOM, message.room.id)
        found = await read.get_persistence_reader().read_by_association(room)
        await persistence.update_by_association(room, {"count": (found[0]["count"] if found else 0) + 1}, upsert=True)


class TestEffectsAreCompared:
    async def test_a_module_level_list_is_caught_with_expected_and_got(self) -> None:
        """The count kept in a module list grows across runs: the record differs, both values shown."""
        SEEN_IDS.clear()
        with pytest.raises(AssertionError) as caught:
            await assert_idempotent(ModuleListCounter, _events(count=3))
        assert 'records with misc:seen: expected 1 record: {"seen":3}; got 1 record: {"seen":9}' in str(caught.value)

    async def test_a_random_command_is_caught_showing_only_where_it_differs(self) -> None:
        """The message names the command and the differing field, not the long identical parts."""
        with pytest.raises(AssertionError) as caught:
            await assert_idempotent(RandomCommand, _events(count=1))
        text = str(caught.value)
        assert "commands: expected 1, got 1" in text
        assert "command //worker.testing/evt-msg-" in text
        assert "data.text: expected 'ticket " in text
        assert "; got 'ticket " in text
        assert "x" * 200 not in text  # the identical long field is left out

    async def test_a_forgotten_await_fails_the_check_naming_the_call(self) -> None:
        """Its events are dead-lettered in every scenario alike; the check fails anyway, naming the call."""
        with pytest.raises(AssertionError, match=r"persistence\.update_by_association\(<misc:seen>.*never awaited"):
            await assert_idempotent(ForgetsAwait, _events(count=2))

    async def test_a_deliberate_dead_letter_passes_the_idempotency_check(self) -> None:
        """DeadLetterNow for a poison message: one dead letter in every scenario, the check passes."""
        events = [message("ok", room="r1"), message("poison", room="r1"), message("ok", room="r2")]
        await assert_idempotent(RefusesSome, events)
        await assert_concurrency_safe(RefusesSome, events)


class TestRepeatedHttp:
    async def test_a_repeated_post_is_reported_and_fails_under_strict(self) -> None:
        """The re-run repeats the POST: listed with how often; strict=True makes it a failure; GETs are not listed."""

        def ok(request: StubRequest) -> tuple[int, Any]:
            return 200, {}

        with HttpStub({"POST /notify": ok, "GET /notify": ok}) as service:
            settings = {"url": f"{service.url}/notify"}
            report = await assert_idempotent(Notifies, _events(count=2), settings=settings)
            assert report.repeated_http == [f"POST {service.url}/notify: 2 calls in one run of each event, 4 when each run is repeated"]
            with pytest.raises(AssertionError) as caught:
                await assert_idempotent(Notifies, _events(count=2), settings=settings, strict=True)
        text = str(caught.value)
        assert "http calls a repeated run made again" in text
        assert f"POST {service.url}/notify: 2 calls in one run of each event, 4 when each run is repeated" in text
        assert "GET" not in text


class TestFailingHandlers:
    async def test_a_handler_that_raises_on_every_event_fails_the_concurrency_check(self) -> None:
        """Equal states of nothing but dead letters prove nothing: the check fails and shows the error."""
        with pytest.raises(AssertionError, match=r"(?s)AlwaysRaises .* failed on 6 of 6 events.*KeyError: 'customFields'"):
            await assert_concurrency_safe(AlwaysRaises, _events(rooms=3, count=6))

    async def test_it_fails_the_idempotency_check_too(self) -> None:
        """The same guard in assert_idempotent."""
        with pytest.raises(AssertionError, match=r"failed on 2 of 2 events"):
            await assert_idempotent(AlwaysRaises, _events(count=2))

    async def test_delivery_counts_the_handlers_dead_letters(self) -> None:
        """check=False: dead_lettered counts the events the handler failed on."""
        async with Harness(AlwaysRaises) as harness:
            delivery = await harness.deliver(_events(count=2), check=False)
            assert delivery.dead_lettered == 2
            assert len(await harness.dead_letters()) == 2


class TestMessageBuilder:
    def test_python_names_become_the_contracts_json_names(self) -> None:
        """thread_id, custom_fields, updated_at are written as threadId, customFields, updatedAt."""
        data = message("x", thread_id="m0", custom_fields={"a": 1}, updated_at="2026-01-01T10:00:00.000Z")
        assert (data["threadId"], data["customFields"], data["updatedAt"]) == ("m0", {"a": 1}, "2026-01-01T10:00:00.000Z")
        assert "thread_id" not in data


class TestRocketChatInTheKit:
    async def test_readers_answer_from_the_stub(self) -> None:
        """Harness(rocketchat=stub): the app user and other users come from the stub."""
        stub = RocketChatStub(users=[{"id": "u-bob", "username": "bob"}], app_user={"id": "bot", "username": "alerts"})

        class Greets(App):
            async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
                me = await read.get_user_reader().get_app_user()
                bob = await read.get_user_reader().get_by_username("bob")
                await persistence.update("seen", {"me": me.username, "bob": bob.id}, upsert=True)

        async with Harness(Greets, rocketchat=stub) as harness:
            await harness.deliver([message("hi")])
            assert await harness.data() == [{"me": "alerts", "bob": "u-bob"}]

    async def test_mentions_skips_the_app_users_own_messages(self) -> None:
        """A message sent by the app user mentions nobody, as far as mentions is concerned."""
        stub = RocketChatStub(app_user={"id": "id-alerts", "username": "alerts"})
        async with Harness(Mentions, rocketchat=stub) as harness:
            await harness.deliver([message("@bob deploy done", sender="alerts"), message("@bob hi", sender="carol")])
            assert [r["count"] for r in await harness.data(Association(AssociationModel.USER, "bob"))] == [1]


class RecordsAppUser(App):
    """Stores what the user reader says of the app user, by get_app_user, get_by_id and get_by_username."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        users = read.get_user_reader()
        me = await users.get_app_user()
        if me is None:
            await persistence.update("app-user", {"me": None}, upsert=True)
            return
        by_id = await users.get_by_id(me.id)
        by_name = await users.get_by_username(me.username) if me.username else None
        await persistence.update(
            "app-user",
            {"me": [me.id, me.username, me.type], "by_id": by_id == me, "by_name": by_name == me},
            upsert=True,
        )


class TestAppUserInTheKit:
    async def test_harness_app_user_id_answers_get_app_user_without_a_stub(self) -> None:
        """Harness(app_user_id=...): get_app_user() and the lookups of that user answer it, no Rocket.Chat needed."""
        async with Harness(RecordsAppUser, app_user_id="id-alerts", app_username="alerts") as harness:
            await harness.deliver([message("hi", sender="carol")])
            assert await harness.data() == [{"me": ["id-alerts", "alerts", "app"], "by_id": True, "by_name": True}]

    async def test_without_an_app_user_get_app_user_raises_the_clear_error(self) -> None:
        """No app_user_id and no stub, as with no Rocket.Chat configured: the run fails at once, the reason naming the call and the fixes."""
        async with Harness(RecordsAppUser) as harness:
            delivery = await harness.deliver([message("hi")], check=False)
            [letter] = await harness.dead_letters()
        assert (delivery.processed, delivery.dead_lettered) == (0, 1)
        assert letter.error_type == "RocketChatUnavailable"
        assert "read.get_user_reader().get_app_user() needs Rocket.Chat's REST API" in letter.reason
        assert "rocketchat.app_user_id" in letter.reason
        assert "Harness(app_user_id=...)" in letter.reason

    async def test_mentions_skips_its_own_messages_given_the_app_user_id(self) -> None:
        """The built-in mentions handler skips the app user's messages: testable with app_user_id alone."""
        events = [message("@bob deploy done", sender="alerts"), message("@bob hi", sender="carol")]
        async with Harness(Mentions, app_user_id="id-alerts") as harness:
            await harness.deliver(events)
            assert [r["count"] for r in await harness.data(Association(AssociationModel.USER, "bob"))] == [1]
        async with Harness(Mentions) as without:  # the same events with no app user: both count
            await without.deliver(events)
            assert [r["count"] for r in await without.data(Association(AssociationModel.USER, "bob"))] == [2]

    async def test_mentions_counts_in_the_default_config(self) -> None:
        """No rocketchat section: get_app_user raises, and mentions takes the message (the runner's loop guard drops its own)."""
        own = Message.model_validate(message("@bob deploy done", sender="alerts"))
        chat = Directory.from_settings(RocketChatSettings()).for_message(own)
        with pytest.raises(RocketChatUnavailable):
            await chat.users.get_app_user()
        mentions = instantiate(Mentions, "mentions", {})
        read = Read(None, mentions.settings, chat)  # type: ignore[arg-type]  # check_ reads no records
        assert await mentions.check_post_message_sent(own, read, Http(HttpSettings()))

    async def test_the_checks_take_the_app_user_too(self) -> None:
        """assert_idempotent and assert_concurrency_safe run the handler with the same app user."""
        events = [message("@bob one", room="r1", sender="alerts"), message("@bob two", room="r2", sender="carol")]
        await assert_idempotent(Mentions, events, app_user_id="id-alerts")
        await assert_concurrency_safe(Mentions, events, app_user_id="id-alerts", copies=2)

    def test_an_app_user_given_twice_or_half_is_refused(self) -> None:
        """app_username without app_user_id, or an id that is not the stub's app user, is a clear error."""
        with pytest.raises(ValueError, match="app_username needs app_user_id"):
            Harness(RecordsAppUser, app_username="alerts")
        stub = RocketChatStub(app_user={"id": "bot", "username": "alerts"})
        with pytest.raises(ValueError, match="not the stub's app user 'bot'"):
            Harness(RecordsAppUser, rocketchat=stub, app_user_id="id-alerts")
        Harness(RecordsAppUser, rocketchat=stub, app_user_id="bot")  # the same user in both places is fine


def test_message_count_still_passes_both_checks() -> None:
    """A correct handler is not flagged by the new checks (run synchronously through the kit's own loop)."""
    import asyncio

    asyncio.run(assert_idempotent(MessageCount, _events()))
