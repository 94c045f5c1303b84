"""worker.testing: events in every accepted form, inspection, and the idempotency and concurrency checks."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from handlers.message_count import MessageCount
from tests.support import FIXTURES
from worker import App, Association, AssociationModel, IHttp, IModify, IPersistence, IRead, Message
from worker.config import PersistenceSettings
from worker.errors import PluginError
from worker.events import Message as EventsMessage
from worker.persistence.store import Store
from worker.testing import Harness, HttpStub, StubRequest, assert_concurrency_safe, assert_idempotent, cloud_event, message, run

TOTAL = Association(AssociationModel.MISC, "message-count")
COUNT = Association(AssociationModel.MISC, "count")


class MemoryCounter(App):
    """Deliberately wrong: keeps its count in the instance."""

    total = 0

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        self.total += 1
        await persistence.update_by_association(COUNT, {"count": self.total}, upsert=True)


class ServiceSettings(BaseModel):
    url: str


class HttpCounter(App):
    """Deliberately wrong: stores a number that a service counts up on every call."""

    settings_model = ServiceSettings

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        response = await http.post(self.settings["url"])
        await persistence.update_by_association(
            Association(AssociationModel.MESSAGE, message.id), {"ticket": response.data["n"]}, upsert=True
        )


class Stamper(App):
    """Writes a random stamp next to a deterministic count."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        room = Association(AssociationModel.ROOM, message.room.id)
        found = await read.get_persistence_reader().read_by_association(room)
        count = found[0]["count"] if found else 0
        await persistence.update_by_association(room, {"count": count + 1, "stamp": uuid.uuid4().hex}, upsert=True)


class NonceTagger(App):
    """Deliberately wrong: stages a command whose content differs on every run."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        updater = modify.get_updater()
        await updater.finish(updater.message(message.id).add_custom_field("nonce", uuid.uuid4().hex))


class Failing(App):
    """Raises on messages whose text says so."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        if message.text == "fail":
            raise ValueError(f"cannot handle {message.id}")
        await persistence.update_by_association(COUNT, {"ok": True}, upsert=True)


def _events(rooms: int = 3, count: int = 9) -> list[dict[str, Any]]:
    return [message(f"m{n}", room=f"r{n % rooms}") for n in range(count)]


class TestEventForms:
    async def test_message_dicts_are_delivered_as_cloud_events_keyed_by_room(self) -> None:
        """IMessage dicts are wrapped in CloudEvents and processed by the real dispatcher."""
        async with Harness(MessageCount) as harness:
            delivery = await harness.deliver([message("a", room="r1"), message("b", room="r2"), message("c", room="r1")])
            assert (delivery.records, delivery.processed, delivery.duplicates) == (3, 3, 0)
            assert await harness.data(TOTAL) == [{"count": 3}]
            assert await harness.data(Association(AssociationModel.ROOM, "r1")) == [{"count": 2}]

    async def test_message_objects_and_cloud_event_dicts_are_accepted(self) -> None:
        """worker.Message objects and whole CloudEvents (their ids kept) are events too."""
        as_object = EventsMessage.model_validate(message("obj"))
        envelope = cloud_event(message("ce"), event_id="evt-fixed")
        async with Harness(MessageCount) as harness:
            await harness.deliver([as_object, envelope])
            again = await harness.deliver([{**envelope, "data": message("other text, same event")}])
            assert again.duplicates == 1
            assert await harness.data(TOTAL) == [{"count": 2}]

    async def test_a_contract_file_is_delivered_line_by_line(self) -> None:
        """A JSON-lines file as `rc-worker load` reads it; duplicates and non-messages handled as in production."""
        async with Harness(MessageCount) as harness:
            delivery = await harness.deliver(FIXTURES / "valid.jsonl")
            lines = (FIXTURES / "valid.jsonl").read_text().splitlines()
            assert delivery.records == len([line for line in lines if line.strip()])
            assert delivery.processed + delivery.duplicates + delivery.skipped == delivery.records
            assert await harness.data(TOTAL) == [{"count": delivery.processed}]

    async def test_invalid_records_in_a_file_are_dead_lettered_with_their_reason(self) -> None:
        """The contract's invalid samples go to dead letters at the decode stage, not to the handler."""
        async with Harness(MessageCount) as harness:
            delivery = await harness.deliver(FIXTURES / "invalid.jsonl")
            letters = await harness.dead_letters()
        why = [json.loads(line)["why"] for line in (FIXTURES / "invalid.jsonl").read_text().splitlines() if line.strip()]
        assert delivery.dead_lettered == len(why) == len(letters)
        assert {letter.stage for letter in letters} == {"decode"}
        assert all(letter.reason for letter in letters)

    async def test_an_invalid_message_dict_is_refused_at_the_call(self) -> None:
        """A dict that is not an IMessage fails before delivery, naming the field and the helper."""
        async with Harness(MessageCount) as harness:
            with pytest.raises(ValueError, match=r"event 1 is not a contract event: data\.createdAt.*worker\.testing\.message\(\)"):
                await harness.deliver([message("ok"), {"id": "m", "room": {"id": "r"}, "sender": {"id": "u"}}])

    async def test_a_string_is_not_taken_for_a_path(self) -> None:
        """Files are given as Path objects; a bare string is a mistake, said so."""
        async with Harness(MessageCount) as harness:
            with pytest.raises(TypeError, match=r"pathlib\.Path"):
                await harness.deliver("events.jsonl")  # type: ignore[arg-type]

    def test_message_fills_in_what_a_test_does_not_care_about(self) -> None:
        """Defaults: a new id, room type c, sender id-<username>, later createdAt each time; extra fields kept."""
        first, second = message("hi", sender="bob", threadId="t1"), message(None, room="ops")
        assert first["sender"] == {"id": "id-bob", "username": "bob", "name": "Bob"}
        assert first["threadId"] == "t1"
        assert "text" not in second
        assert first["id"] != second["id"]
        assert EventsMessage.model_validate(first).created_at < EventsMessage.model_validate(second).created_at


class TestInspection:
    async def test_records_are_filtered_by_every_association_given(self) -> None:
        """records(a, b) are those having both; dump() is what `rc-worker state dump` prints."""
        async with Harness(MessageCount) as harness:
            await harness.deliver([message("x", room="r1")])
            assert [r.data for r in await harness.records(Association(AssociationModel.ROOM, "r1"))] == [{"count": 1}]
            assert await harness.records(TOTAL, Association(AssociationModel.ROOM, "r1")) == []
            dump = await harness.dump()
        assert sorted(d["associations"][0] for d in dump) == ["misc:message-count", "room:r1"]
        assert set(dump[0]) == {"id", "version", "associations", "data"}

    async def test_a_failing_handler_fails_the_delivery_with_its_error(self) -> None:
        """By default a dead-lettered event is an assertion failure naming the event and the error."""
        async with Harness(Failing) as harness:
            with pytest.raises(
                AssertionError,
                match=r"(?s)app 'failing' failed on 1 event\(s\).*after 3 attempts.*evt-m-bad: ValueError: cannot handle m-bad",
            ):
                await harness.deliver([message("fine"), message("fail", message_id="m-bad")])

    async def test_dead_letters_can_be_inspected_instead(self) -> None:
        """check=False: the other events commit; the delivery counts the failed one as dead-lettered, not processed."""
        async with Harness(Failing) as harness:
            delivery = await harness.deliver([message("fine"), message("fail", message_id="m-bad")], check=False)
            [letter] = await harness.dead_letters()
            assert await harness.data(COUNT) == [{"ok": True}]
        assert (delivery.records, delivery.processed, delivery.dead_lettered) == (2, 1, 1)
        assert (letter.stage, letter.app_id, letter.error_type) == ("handler", "failing", "ValueError")
        assert "cannot handle m-bad" in letter.reason

    async def test_settings_are_validated_when_the_harness_is_made(self) -> None:
        """The app's settings_model checks them, with the same message as at worker start-up."""
        from handlers.mentions import Mentions

        with pytest.raises(PluginError, match=r"handlers\.settings\.mentions\.max_per_message"):
            Harness(Mentions, settings={"max_per_message": 0})

    async def test_an_installed_app_is_run_by_its_id(self) -> None:
        """Harness("message-count") loads the installed plugin, as the worker does."""
        async with Harness("message-count") as harness:
            await harness.deliver([message("x")])
            assert harness.app_id == "message-count"
            assert isinstance(harness.app, MessageCount)
            assert await harness.data(TOTAL) == [{"count": 1}]

    def test_an_unknown_app_id_is_refused(self) -> None:
        """An id no plugin has names what is installed."""
        with pytest.raises(PluginError, match=r"no installed app has the id 'nope' \(installed: .*message-count"):
            Harness("nope")

    def test_app_ids_default_to_the_entry_point_name_or_the_class_name(self) -> None:
        """An installed class runs under its entry point's name; another under its kebab-cased name."""
        assert Harness(MessageCount).app_id == "message-count"
        assert Harness(MemoryCounter).app_id == "memory-counter"
        assert Harness(MemoryCounter, app_id="mine").app_id == "mine"

    async def test_batches_commit_as_one_unit_each(self) -> None:
        """batch_size groups records per unit of work, as the worker's fetches do."""
        async with Harness(MessageCount) as harness:
            delivery = await harness.deliver(_events(count=7), batch_size=3)
            assert delivery.processed == 7
            assert await harness.data(TOTAL) == [{"count": 7}]

    async def test_the_database_is_the_worker_store(self) -> None:
        """The harness commits through the real Store: its processed markers are there."""
        async with Harness(MessageCount) as harness:
            await harness.deliver(_events(count=4))
            store = Store.from_settings(PersistenceSettings(url=harness.database_url))  # type: ignore[arg-type]
            try:
                assert await store.processed_count("message-count") == 4
            finally:
                await store.close()

    def test_run_is_a_synchronous_shortcut(self) -> None:
        """run() delivers to a fresh database and returns the final state."""
        state = run(MessageCount, [message("x", room="r9"), message("y", room="r9")])
        assert state.data(Association(AssociationModel.ROOM, "r9")) == [{"count": 2}]

    async def test_run_inside_an_event_loop_points_to_the_harness(self) -> None:
        """In async code, run() cannot block the loop; it says what to use."""
        with pytest.raises(RuntimeError, match="async with Harness"):
            run(MessageCount, [message("x")])

    async def test_a_harness_outside_its_block_says_how_to_use_it(self) -> None:
        """Delivering before `async with` is a clear error."""
        with pytest.raises(RuntimeError, match="async with Harness"):
            await Harness(MessageCount).deliver([message("x")])


class TestIdempotencyCheck:
    async def test_a_correct_handler_passes(self) -> None:
        """message-count: redelivery and repeated runs leave the single-run state."""
        await assert_idempotent(MessageCount, _events())

    async def test_in_memory_state_fails_naming_the_association_and_values(self) -> None:
        """A counter kept in the instance counts repeated runs twice; the message shows expected and got."""
        with pytest.raises(AssertionError) as caught:
            await assert_idempotent(MemoryCounter, _events(count=4))
        text = str(caught.value)
        assert "MemoryCounter (app 'memory-counter') is not idempotent." in text
        assert "Running every handler run again, as after a version conflict" in text
        assert 'records with misc:count: expected 1 record: {"count":4}; got 1 record: {"count":8}' in text
        assert "Keep no state in memory" in text
        assert "Delivering every event twice" not in text  # redelivery is recognised: that part passed

    async def test_counting_with_http_fails(self) -> None:
        """A number that a service counts up differs when the run is repeated."""
        calls: list[int] = []

        def ticket(request: StubRequest) -> tuple[int, Any]:
            calls.append(1)
            return 200, {"n": len(calls)}

        differs = r'records with message:msg-\d+: expected 1 record: \{"ticket":\d+\}; got 1 record'
        with HttpStub({"POST /ticket": ticket}) as service, pytest.raises(AssertionError, match=differs):
            await assert_idempotent(HttpCounter, _events(count=3), settings={"url": f"{service.url}/ticket"})

    async def test_commands_that_differ_between_runs_fail(self) -> None:
        """A command with a random value: the message names each command and the field that differs, with both values."""
        differs = (
            r"command //worker\.testing/evt-msg-\d+/nonce-tagger/0: data\.customFields\.nonce: expected '[0-9a-f]{32}'; got '[0-9a-f]{32}'"
        )
        with pytest.raises(AssertionError, match=differs):
            await assert_idempotent(NonceTagger, _events(count=2))

    async def test_ignored_fields_are_left_out_of_the_comparison(self) -> None:
        """A random stamp fails the check unless ignore_fields names it."""
        with pytest.raises(AssertionError, match=r"records with room:r0"):
            await assert_idempotent(Stamper, _events(count=4))
        await assert_idempotent(Stamper, _events(count=4), ignore_fields=["stamp"])


class TestConcurrencyCheck:
    async def test_a_correct_handler_passes(self) -> None:
        """message-count: four copies at once leave the serial state."""
        await assert_concurrency_safe(MessageCount, _events(rooms=4, count=8))

    async def test_in_memory_state_fails_naming_the_association_and_values(self) -> None:
        """Each copy counts only its own events: the message shows the serial count and what the copies left."""
        with pytest.raises(AssertionError) as caught:
            await assert_concurrency_safe(MemoryCounter, _events(rooms=4, count=8), copies=4)
        text = str(caught.value)
        assert "MemoryCounter (app 'memory-counter') is not concurrency-safe." in text
        assert "4 copies processing the events at once" in text
        # Each copy counted only its own events (more if a conflict repeated one): never all 8.
        assert 'records with misc:count: expected 1 record: {"count":8}; got 1 record: {"count":' in text

    async def test_events_of_one_room_cannot_show_anything(self) -> None:
        """All events in one room would go to one copy: the check refuses instead of passing vacuously."""
        with pytest.raises(ValueError, match="at least 2 rooms"):
            await assert_concurrency_safe(MessageCount, _events(rooms=1, count=4))

    async def test_fewer_than_two_copies_are_refused(self) -> None:
        """copies=1 runs nothing concurrently."""
        with pytest.raises(ValueError, match="at least 2"):
            await assert_concurrency_safe(MessageCount, _events(), copies=1)


def test_the_kit_documents_every_public_function_and_class() -> None:
    """Each function and class in worker.testing.__all__ has a docstring: the kit is the authors' API."""
    import inspect

    import worker.testing

    public = [getattr(worker.testing, name) for name in worker.testing.__all__]
    undocumented = [obj.__name__ for obj in public if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj)]
    assert undocumented == []
