"""What the persistence API promises beyond single calls: awaited calls, result order, upsert's record."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from worker import App, Association, AssociationModel
from worker.apps.persistence import PersistenceReader, PersistenceWriter
from worker.persistence.store import Store
from worker.persistence.unit import UnitOfWork
from worker.testing import Harness, message

APP = "app-a"
ROOM = Association(AssociationModel.ROOM, "r1")


class ForgetsAwait(App):
    """Counts messages, but forgets to await the write."""

    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        persistence.update("counter", {"count": 1}, upsert=True)  # the bug under test: no await


class ForgetsAwaitOnARead(App):
    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        read.get_persistence_reader().read_by_association(ROOM)  # the bug under test: no await


class GathersCalls(App):
    """Awaits its writes through asyncio.gather: they count as awaited and take effect."""

    async def execute_post_message_sent(self, message, read, http, persistence, modify):  # type: ignore[no-untyped-def]
        await asyncio.gather(persistence.update("a", {"n": 1}, upsert=True), persistence.update("b", {"n": 2}, upsert=True))


class TestUnawaitedCalls:
    async def test_a_write_never_awaited_fails_the_event_naming_the_call(self) -> None:
        """The handler's event is dead-lettered with UnawaitedCallError naming persistence.update and the fix."""
        async with Harness(ForgetsAwait) as harness:
            with pytest.raises(AssertionError, match=r"persistence\.update\('counter', .*never awaited.*add `await`"):
                await harness.deliver([message("hi")])
            [letter] = await harness.dead_letters()
            assert letter.error_type == "UnawaitedCallError"
            assert await harness.records() == []

    async def test_a_read_never_awaited_fails_too(self) -> None:
        """Reads are tracked like writes: the call is named with its reader."""
        async with Harness(ForgetsAwaitOnARead) as harness:
            await harness.deliver([message("hi")], check=False)
            [letter] = await harness.dead_letters()
        assert "read.get_persistence_reader().read_by_association(<room:r1>) and never awaited" in letter.reason

    async def test_calls_awaited_through_gather_take_effect(self) -> None:
        """A tracked call is a real coroutine: asyncio.gather awaits it and no error is raised."""
        async with Harness(GathersCalls) as harness:
            await harness.deliver([message("hi")])
            assert sorted(r.id for r in await harness.records()) == ["a", "b"]


class TestTrackedCalls:
    async def test_a_one_association_call_is_one_call_handed_out(self, store: Store) -> None:
        """read_by_association, update_by_association, remove_by_association: one tracked call each, all awaited."""
        unit = UnitOfWork(store)
        reader, writer = PersistenceReader(unit, APP), PersistenceWriter(unit, APP)
        await writer.create_with_association({"n": 1}, ROOM)
        assert await reader.read_by_association(ROOM) == [{"n": 1}]
        assert len(await writer.update_by_association(ROOM, {"n": 2})) == 1
        assert await writer.remove_by_association(ROOM) == [{"n": 2}]
        assert [call.awaited for call in unit.handed_out] == [True] * 4
        assert unit.take_unawaited() == []

    async def test_a_call_closed_before_its_await_never_runs_and_counts_as_not_awaited(self, store: Store) -> None:
        """Closing an unstarted call (as a cancelled gather does) leaves nothing done, and the call is named as unawaited."""
        unit = UnitOfWork(store)
        call = PersistenceWriter(unit, APP).update("counter", {"count": 1}, upsert=True)
        call.close()
        with pytest.raises(RuntimeError, match=r"persistence\.update\('counter', .* was closed before it was awaited"):
            await call
        assert unit.take_unawaited() == ["persistence.update('counter', {'count': 1}, upsert=True)"]
        assert await PersistenceReader(unit, APP).read("counter") is None


class TestResultOrder:
    async def test_association_reads_are_ordered_by_record_id(self, store: Store) -> None:
        """Stored and newly created records come back in one order: by record id."""
        first = UnitOfWork(store)
        first.create(APP, {"n": "z"}, [ROOM], record_id="z")
        await store.commit(first)
        unit = UnitOfWork(store)
        unit.create(APP, {"n": "a"}, [ROOM], record_id="a")
        unit.create(APP, {"n": "m"}, [ROOM], record_id="m")
        found = await PersistenceReader(unit, APP).read_records_by_association(ROOM)
        assert [r.id for r in found] == ["a", "m", "z"]


class TestUpsert:
    async def test_update_with_upsert_creates_the_record_under_that_id_without_associations(self, store: Store) -> None:
        """update(id, data, upsert=True) on a missing id creates exactly that record, with no associations."""
        unit = UnitOfWork(store)
        writer, reader = PersistenceWriter(unit, APP), PersistenceReader(unit, APP)
        assert await writer.update("settings", {"on": True}, upsert=True) == "settings"
        await store.commit(unit)
        check = UnitOfWork(store)
        record: Any = await PersistenceReader(check, APP).read_record("settings")
        assert (record.data, record.associations) == ({"on": True}, ())
        assert await reader.read_by_association(ROOM) == []
