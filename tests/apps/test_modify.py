"""The modify accessor: commands staged as CloudEvents in the outbox, once per committed run.

In-process through worker.testing (the real dispatcher and store), then against the real
broker: after `rc-worker run`, each staged command is on the commands topic exactly once,
though every handler run conflicted once and raised once before it committed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import TopicSet, WorkerProcess, load_events, store_for, wait_until, write_distribution
from worker import App, Association, AssociationModel, IHttp, IModify, IPersistence, IRead, Message, User
from worker.config import PersistenceSettings
from worker.constants import OUTBOX_ID_HEADER
from worker.kafka import read_topic
from worker.persistence.store import Store
from worker.testing import COMMANDS_TOPIC, SOURCE, Harness, cloud_event, message

# A plugin whose every run on an event first meets a concurrent commit (a real version
# conflict), then raises once, and only then commits. It keeps "first time" in memory on
# purpose: it plays the part of bad luck, not of a handler to copy.
FLAKY_SOURCE = """
import asyncio
import sqlite3

from pydantic import BaseModel

from worker import App, Association, AssociationModel

TAGGED = Association(AssociationModel.MISC, "tagged")
BUMPED: set[str] = set()
RAISED: set[str] = set()


class FlakySettings(BaseModel):
    db_path: str


def bump(path: str, app_id: str) -> None:
    # What another worker's commit does to the association this run has read.
    with sqlite3.connect(path, timeout=60) as conn:
        conn.execute(
            "INSERT INTO key_versions (app_id, key, version) VALUES (?, ?, 1) "
            "ON CONFLICT (app_id, key) DO UPDATE SET version = version + 1",
            (app_id, "as:" + str(TAGGED)),
        )
    conn.close()


class FlakyTagger(App):
    settings_model = FlakySettings

    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        found = await read.get_persistence_reader().read_by_association(TAGGED)
        updater = modify.get_updater()
        await updater.finish(updater.message(message.id).add_custom_field("tagged", True))
        if message.id not in BUMPED:
            BUMPED.add(message.id)
            await asyncio.to_thread(bump, self.settings["db_path"], self.id)
        elif message.id not in RAISED:
            RAISED.add(message.id)
            raise RuntimeError("failing once after staging a command")
        count = found[0]["count"] if found else 0
        await persistence.update_by_association(TAGGED, {"count": count + 1}, upsert=True)
"""


def _flaky() -> type[App]:
    namespace: dict[str, Any] = {"__name__": "flaky_tagger_inline"}
    exec(compile(FLAKY_SOURCE, "flaky_tagger_inline", "exec"), namespace)  # noqa: S102 - our own test plugin
    app_class: type[App] = namespace["FlakyTagger"]
    return app_class


class Tagger(App):
    """Tags every message, two ways, and answers in its thread."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        updater = modify.get_updater()
        await updater.finish(updater.message(message.id, editor=message.sender).add_custom_field("seen", True).add_custom_field("n", 1))
        await updater.finish(updater.message(message.id, editor="bot-1").set_custom_fields({"only": "this"}).set_text("edited"))
        creator = modify.get_creator()
        reply = creator.start_message().set_room(message.room).set_sender(User(id="bot-1")).set_text("noted")
        await creator.finish(reply.set_thread_id(message.id).add_attachment({"title": "a"}))


class Misuse(App):
    """Uses the builders wrongly, as the message text says."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        if message.text == "no room":
            await modify.get_creator().finish(modify.get_creator().start_message().set_text("where?"))
        elif message.text == "crossed":
            await modify.get_updater().finish(modify.get_creator().start_message().set_room("r"))
        elif message.text == "updater to creator":
            await modify.get_creator().finish(modify.get_updater().message(message.id))
        else:
            modify.get_updater().message("")


class StageThenFail(App):
    """Stages a command, then always fails."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        updater = modify.get_updater()
        await updater.finish(updater.message(message.id).add_custom_field("x", 1))
        raise RuntimeError("after staging")


class TestStagedCommands:
    async def test_an_update_is_a_cloud_event_keyed_by_room(self) -> None:
        """Type, source, deterministic id, subject, the changes, the editor; keyed by the message's room."""
        async with Harness(Tagger) as harness:
            await harness.deliver([message("hi", room="dev", sender="ann", message_id="m1")])
            first, second, third = await harness.commands()
        assert first.id == f"{SOURCE}/evt-m1/tagger/0"
        assert (first.type, first.subject, first.key, first.app_id) == ("chat.rocket.message.update", "evt-m1", "dev", "tagger")
        assert first.data == {"messageId": "m1", "editor": "id-ann", "customFields": {"seen": True, "n": 1}, "replaceCustomFields": False}
        assert second.id.endswith("/1")
        assert second.data == {
            "messageId": "m1",
            "editor": "bot-1",
            "text": "edited",
            "customFields": {"only": "this"},
            "replaceCustomFields": True,
        }
        assert third.id.endswith("/2")
        assert third.type == "chat.rocket.message.create"
        assert third.data == {
            "roomId": "dev",
            "text": "noted",
            "sender": "bot-1",
            "customFields": {},
            "threadId": "m1",
            "attachments": [{"title": "a"}],
        }

    async def test_the_outbox_row_is_a_structured_cloud_event_for_the_commands_topic(self, tmp_path: Path) -> None:
        """What the worker will publish: the commands topic, the room as key, the CloudEvents content type."""
        async with Harness(Tagger, directory=tmp_path) as harness:
            await harness.deliver([message("hi", room="dev", message_id="m1")])
            store = Store.from_settings(PersistenceSettings(url=harness.database_url))  # type: ignore[arg-type]
            try:
                rows = [m for _, m in await store.outbox_messages()]
            finally:
                await store.close()
        assert [(m.topic, m.key) for m in rows] == [(COMMANDS_TOPIC, b"dev")] * 3
        assert dict(rows[0].headers)["content-type"] == b"application/cloudevents+json"
        envelope = orjson.loads(rows[0].value)
        assert envelope["specversion"] == "1.0"
        assert envelope["source"] == "rc-apps-worker/tagger"
        assert "time" not in envelope  # a repeated run stages the same bytes

    @pytest.mark.parametrize(
        ("text", "reason"),
        [
            ("no room", "a new message needs a room: call set_room"),
            ("crossed", "an update needs a message id: start it with modify.get_updater().message(id)"),
            ("updater to creator", "this builder changes an existing message: finish it with modify.get_updater().finish"),
            ("empty id", "message_id must be a non-empty message id"),
        ],
    )
    async def test_a_misused_builder_fails_the_run_saying_how_to_use_it(self, text: str, reason: str) -> None:
        """The error reaches the dead letter with the fix in it."""
        async with Harness(Misuse) as harness:
            await harness.deliver([message(text)], check=False)
            [letter] = await harness.dead_letters()
            assert await harness.commands() == []
        assert reason in letter.reason


class TestRepeatedRuns:
    async def test_a_run_that_fails_after_staging_leaves_no_command(self) -> None:
        """Commands of a failed run are rolled back with it; the dead letter is all that is left."""
        async with Harness(StageThenFail) as harness:
            await harness.deliver([message("x")], check=False)
            assert await harness.commands() == []
            assert len(await harness.dead_letters()) == 1

    async def test_a_run_that_conflicted_and_raised_stages_its_command_once(self, tmp_path: Path) -> None:
        """A real version conflict, then an error, then success: one command per event, with the first run's id."""
        events = [message("a", room="r1"), message("b", room="r2"), message("c", room="r1")]
        async with Harness(_flaky(), app_id="flaky", settings={"db_path": str(tmp_path / "state.db")}, directory=tmp_path) as harness:
            delivery = await harness.deliver(events)
            commands = await harness.commands()
            assert await harness.data(Association(AssociationModel.MISC, "tagged")) == [{"count": 3}]
        assert delivery.conflicts == 3
        assert sorted(c.id for c in commands) == sorted(f"{SOURCE}/evt-{e['id']}/flaky/0" for e in events)


@pytest.mark.kafka
class TestCommandsTopic:
    async def test_each_command_reaches_the_commands_topic_once_across_retries(
        self, topics: TopicSet, sqlite_url: str, tmp_path: Path
    ) -> None:
        """`rc-worker run` with a handler that conflicts and raises once per event: N events, N commands, no repeat."""
        site = write_distribution(
            tmp_path / "site", "flaky-dist", {"flaky-tagger": "flaky_tagger_plugin:FlakyTagger"}, {"flaky_tagger_plugin": FLAKY_SOURCE}
        )
        db_path = sqlite_url.removeprefix("sqlite+aiosqlite:///")
        env = topics.env(
            sqlite_url,
            PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            RC_WORKER_HANDLERS__ENABLED='["flaky-tagger"]',
            RC_WORKER_HANDLERS__SETTINGS=json.dumps({"flaky-tagger": {"db_path": db_path}}),
        )
        events = [cloud_event(message(f"m{n}", room=f"room-{n % 3}")) for n in range(12)]
        load_events(events, tmp_path / "events.jsonl", env)

        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:

            async def processed() -> bool:
                async with store_for(sqlite_url) as store:
                    return await store.processed_count("flaky-tagger") == len(events)

            await wait_until(processed, timeout=120, what="every event processed")

            async def published() -> list[dict[str, Any]]:
                found = [r async for r in read_topic(topics.kafka_settings(), topics.commands_topic, idle_timeout_ms=1000)]
                return found if len(found) >= len(events) else []

            await wait_until(published, timeout=60, what="the commands on the commands topic")
        finally:
            assert worker.terminate() == 0
        records = [r async for r in read_topic(topics.kafka_settings(), topics.commands_topic, idle_timeout_ms=1000)]
        ids = [orjson.loads(r.value or b"")["id"] for r in records]
        assert sorted(ids) == sorted(f"{e['source']}/{e['id']}/flaky-tagger/0" for e in events)
        assert len({r.header(OUTBOX_ID_HEADER) for r in records}) == len(events)
        assert worker.events("batch_conflict"), "no run met a version conflict: the test proved nothing"
        assert worker.events("handler_retry"), "no run raised: the test proved nothing"
