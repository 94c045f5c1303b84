"""``rc-worker apply`` over the real broker and the fake Rocket.Chat: effects once, retries, dead letters, commits."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from tests.fakes.rocketchat import FakeRocketChat
from tests.support import TopicSet, wait_until
from worker import constants
from worker.apps.modify import CREATE_MESSAGE, DELETE_MESSAGE, NOTIFY_ROOM, NOTIFY_USER, UPDATE_MESSAGE
from worker.bridge.apply import Applier
from worker.bridge.commands import REACT_MESSAGE, message_id_for
from worker.config import RocketChatSettings, Settings
from worker.kafka import Outgoing, Producer, admin, group_offsets, read_topic
from worker.rocketchat.client import RocketChatClient


def command(kind: str, command_id: str, data: dict[str, Any]) -> bytes:
    """A command as worker.modify stages it."""
    return orjson.dumps({"specversion": "1.0", "type": kind, "source": "rc-apps-worker/test", "id": command_id, "data": data})


async def create_topic(settings: Settings, name: str) -> None:
    from aiokafka.admin import NewTopic

    async with admin(settings.kafka) as client:
        await client.create_topics([NewTopic(name, num_partitions=1, replication_factor=1)])


def _settings(topics: TopicSet, fake: FakeRocketChat) -> Settings:
    rocketchat = RocketChatSettings.model_validate(
        {
            "url": "http://rc.test",
            "user_id": fake.user_id,
            "auth_token": fake.auth_token,
            "apply_group_id": f"{topics.group_id}-apply",
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.2,
        }
    )
    return Settings(kafka=topics.kafka_settings(), rocketchat=rocketchat)


async def _run_until(applier: Applier, done: Any) -> None:
    task = asyncio.create_task(applier.run())
    try:
        await wait_until(lambda: done() or task.done(), timeout=90, what="the applier to apply every command")
        assert not task.done(), task.exception()
    finally:
        applier.stop()
        await asyncio.wait_for(task, 60)


@pytest.mark.kafka
class TestApplier:
    async def test_each_command_changes_rocket_chat_once_and_refusals_are_dead_lettered(self, topics: TopicSet) -> None:
        """Creates, updates and reactions take effect once through 429s and 5xx; bad commands go to <commands>.dlq with the reason."""
        fake = FakeRocketChat(rate_limit=3, rate_window_s=1)
        fake.add_message("m1", "GENERAL", "hello @alice", customFields={"theirs": "kept"})
        fake.fail_next("chat.update", 502, 503)
        settings = _settings(topics, fake)
        dead_letters = f"{topics.commands_topic}.dlq"
        await create_topic(settings, dead_letters)
        values = [
            (b"GENERAL", command(CREATE_MESSAGE, "c/1", {"roomId": "GENERAL", "text": "reply", "customFields": {}})),
            (b"GENERAL", command(CREATE_MESSAGE, "c/1", {"roomId": "GENERAL", "text": "reply", "customFields": {}})),  # a repeat
            (b"GENERAL", command(UPDATE_MESSAGE, "c/2", {"messageId": "m1", "customFields": {"mentions": ["alice"]}})),
            (b"GENERAL", command(REACT_MESSAGE, "c/3", {"messageId": "m1", "emoji": ":eyes:", "shouldReact": True})),
            (b"GENERAL", command(CREATE_MESSAGE, "c/4", {"roomId": "GENERAL", "text": "x" * 5001})),  # refused: too long
            (b"GENERAL", b"not a command"),
        ]
        async with Producer(settings.kafka) as producer:
            await producer.send_many(
                [Outgoing(topics.commands_topic, key, value, [("content-type", b"application/cloudevents+json")]) for key, value in values]
            )

        applier = Applier(settings, RocketChatClient(settings.rocketchat, transport=httpx.ASGITransport(app=fake.app)))
        await _run_until(applier, lambda: applier.tally["applied"] + applier.tally["dead_lettered"] >= len(values))

        created = message_id_for("c/1")
        assert fake.inserts == {created: 1}
        assert fake.messages[created]["msg"] == "reply"
        assert fake.messages["m1"]["customFields"] == {"theirs": "kept", "mentions": ["alice"]}
        assert fake.messages["m1"]["reactions"] == {":eyes:": {"usernames": [fake.username]}}
        assert fake.count("chat.update", 502) == fake.count("chat.update", 503) == 1
        assert fake.count("chat.sendMessage", 429) + fake.count("chat.getMessage", 429) + fake.count("chat.react", 429) >= 1
        assert applier.tally["retried"] >= 3

        letters = [record async for record in read_topic(settings.kafka, dead_letters)]
        reasons = sorted((dict(r.headers)[constants.DLQ_ERROR_TYPE], dict(r.headers)[constants.DLQ_STAGE]) for r in letters)
        assert reasons == [(b"DecodeError", b"apply"), (b"RocketChatError", b"apply")]
        assert any(b"Message_MaxAllowedSize" in dict(r.headers)[constants.DLQ_REASON] for r in letters)

        # Offsets were committed after the effects: the group has nothing left to read.
        committed = await group_offsets(settings.kafka, settings.rocketchat.apply_group_id, topics.commands_topic)
        assert sum(offset for offset, _ in committed.values()) == len(values)

    async def test_deletes_and_notifications_change_rocket_chat_once(self, topics: TopicSet) -> None:
        """Deletes and notifications, each sent twice, take effect once through 5xx; refusals are dead-lettered with the reason."""
        fake = FakeRocketChat()
        fake.add_message("m1", "GENERAL", "delete me")
        fake.fail_next("chat.delete", 502)
        fake.fail_next("im.create", 503)
        settings = _settings(topics, fake)
        dead_letters = f"{topics.commands_topic}.dlq"
        await create_topic(settings, dead_letters)
        delete = command(DELETE_MESSAGE, "c/1", {"messageId": "m1", "roomId": "GENERAL", "user": None})
        notify_room = command(NOTIFY_ROOM, "c/2", {"roomId": "GENERAL", "text": "heads up"})
        notify_user = command(NOTIFY_USER, "c/3", {"userId": "u-1", "username": "alice", "text": "psst"})
        notify_by_id = command(NOTIFY_USER, "c/6", {"userId": "u-1", "text": "by id"})
        values = [
            delete,
            delete,  # a repeat: the message is gone
            notify_room,
            notify_room,
            notify_user,
            notify_user,
            command(DELETE_MESSAGE, "c/4", {"messageId": "m1", "roomId": "OTHER"}),  # gone too: done, not refused
            command(NOTIFY_USER, "c/5", {"userId": "u-9", "username": "nobody", "text": "psst"}),  # refused: unknown user
            notify_by_id,  # only the user id: users.info finds the username
            notify_by_id,
            command(NOTIFY_USER, "c/7", {"userId": "u-1", "text": "again"}),  # the username comes from the cache
            command(NOTIFY_USER, "c/8", {"userId": "u-9", "text": "psst"}),  # refused: users.info knows no u-9
            command(NOTIFY_USER, "c/9", {"text": "psst"}),  # refused: names nobody
        ]
        async with Producer(settings.kafka) as producer:
            await producer.send_many(
                [
                    Outgoing(topics.commands_topic, b"GENERAL", value, [("content-type", b"application/cloudevents+json")])
                    for value in values
                ]
            )

        applier = Applier(settings, RocketChatClient(settings.rocketchat, transport=httpx.ASGITransport(app=fake.app)))
        await _run_until(applier, lambda: applier.tally["applied"] + applier.tally["dead_lettered"] >= len(values))

        assert fake.deletes == {"m1": 1}
        assert fake.inserts == {message_id_for(c): 1 for c in ("c/2", "c/3", "c/6", "c/7")}
        [direct_room] = fake.direct_rooms
        assert fake.rooms_created == {direct_room: 1}
        assert {fake.messages[message_id_for(c)]["rid"] for c in ("c/3", "c/6", "c/7")} == {direct_room}
        assert fake.messages[message_id_for("c/6")]["msg"] == "by id"
        lookups = [(c.params, c.status) for c in fake.calls if c.endpoint == "users.info"]
        assert lookups == [({"userId": "u-1"}, 200), ({"userId": "u-9"}, 400)]  # u-1 once for three commands: cached
        assert fake.messages[message_id_for("c/2")]["rid"] == "GENERAL"
        assert fake.count("chat.delete", 502) == fake.count("im.create", 503) == 1
        assert applier.tally["retried"] >= 2

        letters = [record async for record in read_topic(settings.kafka, dead_letters)]
        refusals = sorted((dict(r.headers)[constants.DLQ_ERROR_TYPE], dict(r.headers)[constants.DLQ_REASON]) for r in letters)
        assert [error_type for error_type, _ in refusals] == [b"DecodeError", b"RocketChatError", b"RocketChatError"]
        assert b"neither username nor userId" in refusals[0][1]
        assert [b"Invalid user" in reason for _, reason in refusals[1:]].count(True) == 1
        assert [b"no user with id 'u-9'" in reason for _, reason in refusals[1:]].count(True) == 1
