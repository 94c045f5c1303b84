"""One unit of work for several partitions' batches: exact, no conflicts among them, and a partition that must wait leaves it."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest

from handlers.mentions import Mentions
from handlers.message_count import MessageCount
from worker.apps.contract import App
from worker.apps.http import Http
from worker.config import HttpSettings, ProcessingSettings
from worker.errors import FencedError
from worker.events import Message, RawRecord
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Fence, Store
from worker.pipeline.combine import Combiner
from worker.pipeline.dispatch import Dispatcher, Part, Topics
from worker.pipeline.hooks import Hooks
from worker.plugins import instantiate

TOPIC = "events"
GROUP = "g"
SETTINGS = ProcessingSettings(backoff_initial_ms=1, backoff_max_ms=5, handler_max_attempts=3)


def record(partition: int, offset: int, room: str, text: str = "hi") -> RawRecord:
    """A PostMessageSent record of ``room``, as the worker fetches it."""
    message = {
        "id": f"m-{partition}-{offset}",
        "room": {"id": room},
        "sender": {"id": "u", "username": "alice"},
        "text": text,
        "createdAt": "2026-11-29T10:00:00.000Z",
    }
    event = {"specversion": "1.0", "type": "chat.rocket.message.sent", "source": "//t", "id": f"e-{partition}-{offset}", "data": message}
    return RawRecord(TOPIC, partition, offset, 0, room.encode(), orjson.dumps(event))


def batch(partition: int, start: int, count: int, text: str = "hi") -> list[RawRecord]:
    """``count`` records of partition ``partition`` from ``start``, each partition its own room."""
    return [record(partition, offset, f"room-{partition}", text) for offset in range(start, start + count)]


class Flaky(App):
    """Fails each message in ``fail`` on its first ``times`` runs; counts every run."""

    def __init__(self, fail: set[str], times: int) -> None:
        self.fail, self.times = fail, times
        self.runs: Counter[str] = Counter()

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        self.runs[message.id] += 1
        if message.id in self.fail and self.runs[message.id] <= self.times:
            raise ValueError(f"not yet: {message.id}")


def dispatcher(store: Store, *apps: App) -> Dispatcher:
    """A dispatcher of ``apps`` on ``store``."""
    return Dispatcher(list(apps), store, Http(HttpSettings()), Topics("dlq", "cmd"), SETTINGS)


async def counts(store: Store) -> dict[str, int]:
    """message-count's counters by association."""
    found: dict[str, int] = {}
    for stored in await store.app_records("message-count"):
        for association in stored.associations:
            found[association] = orjson.loads(stored.data)["count"]
    return found


async def fences(store: Store, partitions: list[int]) -> dict[int, Fence]:
    """This worker's claims on ``partitions``."""
    return {p: c.fence for p, c in (await store.claim(GROUP, TOPIC, partitions, "test")).items()}


class TestTogether:
    async def test_the_batches_of_several_partitions_commit_as_one_unit_without_conflicting(self, store: Store) -> None:
        """Each partition's counter and the global one are exact, every offset is stored, and the shared counter costs no conflict."""
        claims = await fences(store, [0, 1, 2])
        count = dispatcher(store, instantiate(MessageCount, "message-count", {}))
        snapshot = Snapshot()
        for start in (0, 5):
            parts = [Part(batch(p, start, 5), claims[p]) for p in range(3)]
            results = await count.dispatch_together(parts, snapshot)
            assert sorted(results) == [0, 1, 2]
            assert [(r.processed, r.conflicts, r.next_offset) for r in results.values()] == [(5, 0, start + 5)] * 3
        assert await counts(store) == {"misc:message-count": 30, "room:room-0": 10, "room:room-1": 10, "room:room-2": 10}
        assert await store.stored_offsets(GROUP, TOPIC) == {0: 10, 1: 10, 2: 10}

    async def test_outbox_rows_are_staged_for_the_partition_whose_event_staged_them(self, store: Store) -> None:
        """Commands of a shared unit are published by their own partition's lane, so each keeps its order and its fence."""
        claims = await fences(store, [0, 1])
        tagger = dispatcher(store, instantiate(Mentions, "mentions", {"reset_on_post": False}))
        parts = [Part(batch(p, 0, 2, text="hello @bob"), claims[p]) for p in (0, 1)]
        results = await tagger.dispatch_together(parts, Snapshot())
        assert [r.staged_outbox for r in results.values()] == [2, 2]
        for partition in (0, 1):
            pending = await store.pending_outbox(TOPIC, partition, 10)
            assert [orjson.loads(p.message.value)["id"] for p in pending] == [f"//t/e-{partition}-{n}/mentions/0" for n in (0, 1)]

    async def test_a_partition_whose_handler_must_wait_leaves_the_unit_at_that_event_and_the_rest_commits(self, store: Store) -> None:
        """The failing event and those after it are left out (to back off on their own); all else commits now, no handler run repeated."""
        claims = await fences(store, [0, 1, 2])
        flaky = Flaky({"m-1-2"}, times=1)
        flaky.bind("flaky", {})
        parts = [Part(batch(p, 0, 4), claims[p]) for p in range(3)]
        results = await dispatcher(store, flaky).dispatch_together(parts, Snapshot())
        assert [(p, r.processed, r.next_offset) for p, r in sorted(results.items())] == [(0, 4, 4), (1, 2, 2), (2, 4, 4)]
        assert [r.offset for r in parts[1].rest] == [2, 3]
        assert parts[1].failures.runs[("flaky", "//t", "e-1-2")] == 1
        assert await store.stored_offsets(GROUP, TOPIC) == {0: 4, 1: 2, 2: 4}
        assert set(flaky.runs.values()) == {1}

    async def test_a_partition_whose_first_event_must_wait_leaves_the_unit_whole(self, store: Store) -> None:
        """Nothing of it went through: it has no result, and the others commit."""
        claims = await fences(store, [0, 1])
        flaky = Flaky({"m-1-0"}, times=1)
        flaky.bind("flaky", {})
        parts = [Part(batch(p, 0, 3), claims[p]) for p in range(2)]
        results = await dispatcher(store, flaky).dispatch_together(parts, Snapshot())
        assert sorted(results) == [0]
        assert await store.stored_offsets(GROUP, TOPIC) == {0: 3}


class TestCombiner:
    async def test_lanes_handing_in_together_share_a_unit_and_a_failing_one_finishes_alone(self, store: Store) -> None:
        """Every batch commits; the failing partition's handler runs handler_max_attempts times at most, its event once counted."""
        claims = await fences(store, [0, 1, 2])
        flaky = Flaky({"m-1-2"}, times=2)
        flaky.bind("flaky", {})
        combiner = Combiner(dispatcher(store, flaky, instantiate(MessageCount, "message-count", {})))
        results = await asyncio.gather(*(combiner.dispatch(batch(p, 0, 4), claims[p], snapshot=Snapshot()) for p in range(3)))
        assert [r.next_offset for r in results] == [4, 4, 4]
        assert flaky.runs["m-1-2"] == 3  # two failures, then the run that passes: within handler_max_attempts=3
        assert (await counts(store))["misc:message-count"] == 12
        assert await store.stored_offsets(GROUP, TOPIC) == {0: 4, 1: 4, 2: 4}

    async def test_batches_handed_in_by_tasks_started_together_run_as_one_unit(self, store: Store) -> None:
        """The first to start waits a step for the others, rather than taking the turn alone and leaving them a second unit."""
        claims = await fences(store, [0, 1, 2])
        combiner = Combiner(dispatcher(store, instantiate(MessageCount, "message-count", {})))
        units: list[int] = []
        together = combiner.dispatcher.dispatch_together

        async def counted(parts: Any, *args: Any) -> Any:
            units.append(len(parts))
            return await together(parts, *args)

        combiner.dispatcher.dispatch_together = counted  # type: ignore[method-assign]
        await asyncio.gather(*(combiner.dispatch(batch(p, 0, 2), claims[p], snapshot=Snapshot()) for p in range(3)))
        assert units == [3]
        assert (await counts(store))["misc:message-count"] == 6

    async def test_each_failure_of_a_handler_that_left_the_unit_is_reported_once(self, store: Store) -> None:
        """The failure in the shared unit and the one in its lone run each reach handler_failed, with their attempt."""

        class Failures(Hooks):
            def __init__(self) -> None:
                self.seen: list[tuple[str, str, int, bool]] = []

            def handler_failed(self, app_id: str, exc: Exception, attempt: int, retrying: bool) -> None:
                self.seen.append((app_id, str(exc), attempt, retrying))

        claims = await fences(store, [0, 1])
        flaky = Flaky({"m-1-2"}, times=2)
        flaky.bind("flaky", {})
        hooks = Failures()
        dispatching = Dispatcher([flaky], store, Http(HttpSettings()), Topics("dlq", "cmd"), SETTINGS, hooks)
        combiner = Combiner(dispatching)
        async with combiner._turn:  # both batches wait for the same turn: one shared unit
            tasks = [asyncio.create_task(combiner.dispatch(batch(p, 0, 4), claims[p], snapshot=Snapshot())) for p in range(2)]
            await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
        assert [r.next_offset for r in results] == [4, 4]
        assert hooks.seen == [("flaky", "not yet: m-1-2", 1, True), ("flaky", "not yet: m-1-2", 2, True)]
        assert flaky.runs["m-1-2"] == 3

    async def test_a_fenced_partition_fails_alone(self, store: Store) -> None:
        """When one partition has a new owner, the shared commit fails; the others then commit alone and the fenced one raises."""
        claims = await fences(store, [0, 1])
        await store.claim(GROUP, TOPIC, [1], "another worker")  # partition 1's claim is now stale
        combiner = Combiner(dispatcher(store, instantiate(MessageCount, "message-count", {})))
        found = await asyncio.gather(
            *(combiner.dispatch(batch(p, 0, 3), claims[p], snapshot=Snapshot()) for p in (0, 1)), return_exceptions=True
        )
        assert found[0].next_offset == 3  # type: ignore[union-attr]
        assert isinstance(found[1], FencedError)
        assert await counts(store) == {"misc:message-count": 3, "room:room-0": 3}


@pytest.mark.parametrize("handlers", [("message-count",)])
def test_parts_decode_their_records_once(handlers: tuple[str, ...]) -> None:
    """A part knows its next offset and holds its records decoded."""
    part = Part(batch(4, 7, 3), None)
    assert part.next_offset == 10
    assert [item.id for _, item in part.decoded] == ["e-4-7", "e-4-8", "e-4-9"]  # type: ignore[union-attr]


class TestHotKeys:
    async def test_two_workers_counting_on_one_global_counter_stay_exact(self, store: Store) -> None:
        """Two workers' shared units conflict on the counter, lock it first from then on, and lose or double nothing."""
        claims = await fences(store, [0, 1, 2, 3])
        workers = {0: [0, 1], 1: [2, 3]}
        combiners = {w: Combiner(dispatcher(store, instantiate(MessageCount, "message-count", {}))) for w in workers}

        async def worker(index: int) -> None:
            for start in range(0, 40, 4):
                await asyncio.gather(
                    *(combiners[index].dispatch(batch(p, start, 4), claims[p], snapshot=Snapshot()) for p in workers[index])
                )

        await asyncio.gather(worker(0), worker(1))
        assert await counts(store) == {"misc:message-count": 160, **{f"room:room-{p}": 40 for p in range(4)}}
        assert await store.stored_offsets(GROUP, TOPIC) == dict.fromkeys(range(4), 40)

    async def test_a_unit_with_hot_keys_locks_them_first_and_does_not_conflict_on_them(self, store: Store) -> None:
        """Another worker's count just before the unit is read under the lock: no conflict, and exact."""
        claims = await fences(store, [0])
        count = dispatcher(store, instantiate(MessageCount, "message-count", {}))
        snapshot = Snapshot()
        await count.dispatch_together([Part(batch(0, 0, 2), claims[0])], snapshot)
        await dispatcher(store, instantiate(MessageCount, "message-count", {})).dispatch(batch(5, 0, 3), None)  # the snapshot is stale now
        total = next(r for r in snapshot.records.values() if r is not None and "misc:message-count" in r.associations)
        hot = {("message-count", "as:misc:message-count"), ("message-count", f"id:{total.id}")}
        results = await count.dispatch_together([Part(batch(0, 2, 2), claims[0])], snapshot, hot)
        assert [(r.locked, r.conflicts) for r in results.values()] == [(True, 0)]
        assert (await counts(store))["misc:message-count"] == 7

    @pytest.mark.postgres
    async def test_apps_without_a_hot_key_run_before_the_locks_so_other_workers_count_meanwhile(self, postgres_url: str) -> None:
        """While the other apps run, another worker commits to the hot counter without waiting; the hot app then reads it, locked."""
        from tests.support import store_for

        async with store_for(postgres_url) as store, store_for(postgres_url) as other:
            claims = await fences(store, [0])
            elsewhere = dispatcher(other, instantiate(MessageCount, "message-count", {}))
            runs: list[str] = []

            class Meanwhile(App):
                async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
                    runs.append(f"meanwhile {message.id}")
                    # Another worker's unit commits (optimistically, with a lock timeout) now.
                    await asyncio.wait_for(elsewhere.dispatch([record(5, len(runs), "room-5")], None), 30)

            class Counting(MessageCount):
                async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
                    runs.append(f"count {message.id}")
                    await super().execute_post_message_sent(message, read, http, persistence, modify)

            count = dispatcher(store, instantiate(Counting, "message-count", {}), instantiate(Meanwhile, "meanwhile", {}))
            hot = {("message-count", "as:misc:message-count")}
            results = await count.dispatch_together([Part(batch(0, 0, 2), claims[0])], Snapshot(), hot)
            assert [(r.processed, r.locked, r.conflicts) for r in results.values()] == [(2, True, 0)]
            assert runs == ["meanwhile m-0-0", "meanwhile m-0-1", "count m-0-0", "count m-0-1"]
            assert (await counts(store))["misc:message-count"] == 4  # two of its own, two of the other worker's
            assert results[0].outcomes == Counter({("message-count", "processed"): 2, ("meanwhile", "processed"): 2})

    @pytest.mark.postgres
    async def test_the_hot_keys_are_locked_in_one_statement_with_what_the_other_apps_read_and_wrote(
        self, postgres_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Mentions' app-global keys are taken in key order with the hot counter, not after it: no worker holds one while waiting for the other."""
        from tests.support import store_for
        from worker.persistence.store import LockedSession

        statements: list[list[tuple[str, str]]] = []
        lock = LockedSession.lock

        async def recorded(session: LockedSession, keys: Any) -> dict[tuple[str, str], int]:
            statements.append(sorted(set(keys)))
            return await lock(session, keys)

        monkeypatch.setattr(LockedSession, "lock", recorded)
        async with store_for(postgres_url) as store:
            claims = await fences(store, [0])
            count = dispatcher(store, instantiate(MessageCount, "message-count", {}), instantiate(Mentions, "mentions", {}))
            hot = {("message-count", "as:misc:message-count")}
            results = await count.dispatch_together([Part(batch(0, 0, 2, text="hi @bob"), claims[0])], Snapshot(), hot)
            assert [(r.processed, r.conflicts) for r in results.values()] == [(2, 0)]
            first = statements[0]
            assert ("message-count", "as:misc:message-count") in first
            assert {("mentions", "as:misc:unread-mentions"), ("mentions", "as:user:bob")} <= set(first)

    @pytest.mark.postgres
    async def test_a_unit_run_in_two_passes_stages_its_commands_in_event_order(self, postgres_url: str) -> None:
        """The hot app's commands and the others' interleave per event, in app order, as in one pass."""
        from tests.support import store_for

        class Tagging(MessageCount):
            async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
                await super().execute_post_message_sent(message, read, http, persistence, modify)
                updater = modify.get_updater()
                await updater.finish(updater.message(message.id).add_custom_field("counted", True))

        async with store_for(postgres_url) as store:
            claims = await fences(store, [0])
            count = dispatcher(
                store,
                instantiate(Tagging, "message-count", {}),
                instantiate(Mentions, "mentions", {"reset_on_post": False}),
            )
            hot = {("message-count", "as:misc:message-count")}
            results = await count.dispatch_together([Part(batch(0, 0, 3, text="hi @bob"), claims[0])], Snapshot(), hot)
            assert [r.staged_outbox for r in results.values()] == [6]
            pending = await store.pending_outbox(TOPIC, 0, 10)
            assert [orjson.loads(p.message.value)["id"] for p in pending] == [
                f"//t/e-0-{n}/{app}/0" for n in range(3) for app in ("message-count", "mentions")
            ]

    @pytest.mark.postgres
    async def test_a_hot_app_that_must_wait_takes_its_partition_out_of_the_unit_whole(self, postgres_url: str) -> None:
        """The other apps already ran past its event, so the partition runs again alone; the rest commits and nothing doubles."""
        from tests.support import store_for

        class FlakyCount(MessageCount):
            failed = False

            async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
                if message.id == "m-1-1" and not FlakyCount.failed:
                    FlakyCount.failed = True
                    raise ValueError("not yet")
                await super().execute_post_message_sent(message, read, http, persistence, modify)

        async with store_for(postgres_url) as store:
            claims = await fences(store, [0, 1])
            combiner = Combiner(
                dispatcher(store, instantiate(FlakyCount, "message-count", {}), instantiate(Mentions, "mentions", {"reset_on_post": False}))
            )
            combiner.hot.add(("message-count", "as:misc:message-count"))
            results = await asyncio.gather(
                *(combiner.dispatch(batch(p, 0, 3, text="hi @bob"), claims[p], snapshot=Snapshot()) for p in (0, 1))
            )
            assert [(r.next_offset, r.processed) for r in results] == [(3, 3), (3, 3)]
            assert await counts(store) == {"misc:message-count": 6, "room:room-0": 3, "room:room-1": 3}
            unread = [orjson.loads(r.data) for r in await store.app_records("mentions")]
            assert sorted(u["count"] for u in unread) == [3, 3]
            assert await store.stored_offsets(GROUP, TOPIC) == {0: 3, 1: 3}

    async def test_on_sqlite_hot_keys_never_hold_the_database_while_handlers_run(self, sqlite_url: str) -> None:
        """Locking a key on SQLite locks the whole file: a handler's own write elsewhere must not wait on it."""
        from tests.support import store_for

        async with store_for(sqlite_url) as store, store_for(sqlite_url) as other:

            class WritesElsewhere(MessageCount):
                async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
                    # What another worker's commit, or an operator's tool, does meanwhile.
                    await other.claim("another-group", TOPIC, [0], message.id)
                    await super().execute_post_message_sent(message, read, http, persistence, modify)

            claims = await fences(store, [0])
            count = dispatcher(store, instantiate(WritesElsewhere, "message-count", {}))
            hot = {("message-count", "as:misc:message-count")}
            results = await asyncio.wait_for(count.dispatch_together([Part(batch(0, 0, 3), claims[0])], Snapshot(), hot), 60)
            assert [r.next_offset for r in results.values()] == [3]
            assert (await counts(store))["misc:message-count"] == 3


async def test_a_batch_in_many_new_rooms_costs_as_many_round_trips_as_one_in_few(store: Store) -> None:
    """Once message-count has read a room, the rooms of each later batch are read ahead together."""
    claims = await fences(store, [0])
    count = dispatcher(store, instantiate(MessageCount, "message-count", {}))
    snapshot = Snapshot()
    await count.dispatch([record(0, 0, "first-room")], claims[0], snapshot=snapshot)
    assert count.room_readers == {"message-count"}
    counted: list[int] = []
    store.count_round_trips(counted.append)

    async def round_trips(start: int, rooms: int) -> int:
        counted.clear()
        records = [record(0, start + n, f"room-{start}-{n}") for n in range(rooms)]
        result = await count.dispatch(records, claims[0], snapshot=snapshot)
        assert result.processed == rooms
        return sum(counted)

    few = await round_trips(1, 2)
    assert await round_trips(3, 40) == few
    assert (await counts(store))["misc:message-count"] == 43


async def test_a_first_batch_in_many_new_rooms_costs_as_many_round_trips_as_one_in_few(store: Store) -> None:
    """Before the dispatcher has learned that message-count reads rooms, its first room read reads all of the batch's rooms."""
    claims = await fences(store, [0, 1, 2])
    # The global counter exists before either batch, so both update it rather than one creating it.
    await dispatcher(store, instantiate(MessageCount, "message-count", {})).dispatch(
        [record(2, 0, "warm-up")], claims[2], snapshot=Snapshot()
    )
    counted: list[int] = []
    store.count_round_trips(counted.append)

    async def round_trips(partition: int, rooms: int) -> int:
        count = dispatcher(store, instantiate(MessageCount, "message-count", {}))  # nothing learned yet
        counted.clear()
        records = [record(partition, n, f"first-{partition}-{n}") for n in range(rooms)]
        result = await count.dispatch(records, claims[partition], snapshot=Snapshot())
        assert result.processed == rooms
        assert count.room_readers == {"message-count"}
        return sum(counted)

    few = await round_trips(0, 2)
    assert await round_trips(1, 40) == few
    assert (await counts(store))["misc:message-count"] == 43
