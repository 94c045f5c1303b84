"""One poison value never stops a partition: refused where it enters, or isolated at commit.

A value the schema cannot hold (too long, NUL, a lone surrogate) is refused by the decoder
(a dead letter at stage "decode") or when a handler stages it (InvalidDataError, a handler
dead letter); one the database still refuses at commit splits the batch until the event that
carries it is dead-lettered with the database's message, and the rest commit. Each runs on
both backends through the real Dispatcher and Store, with the partition's fence.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.support import TopicSet, store_for
from tests.test_failures import (
    STRUCTURED,
    counted,
    dead_letters,
    end_offsets,
    event_value,
    group_offsets,
    message_count,
    nonempty,
    produce,
    room_counts,
    running,
    settings_for,
    until,
)
from worker import Association, AssociationModel, IHttp, IModify, IPersistence, IRead, Message, constants, limits
from worker.apps.contract import App
from worker.apps.http import Http
from worker.config import HttpSettings, PersistenceSettings, ProcessingSettings
from worker.errors import DataError, DecodeError, InvalidDataError, PersistenceError
from worker.events import RawRecord, decode
from worker.persistence import schema
from worker.persistence import unit as unit_module
from worker.persistence.snapshot import Snapshot
from worker.persistence.sql import translate
from worker.persistence.store import Fence, Store
from worker.persistence.unit import UnitOfWork
from worker.persistence.values import encode_data
from worker.pipeline.combine import Combiner
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.pipeline.tally import BatchResult
from worker.plugins import instantiate

TOPIC = "poison"
DLQ = f"{TOPIC}.dlq"
SOURCE = "//poison.test"


def event(event_id: str, *, source: str = SOURCE, message_id: str = "m", room: str = "r", sender: str = "u", text: str = "") -> bytes:
    """A structured-mode PostMessageSent; json.dumps escapes what is not ASCII, lone surrogates too."""
    return json.dumps(
        {
            "specversion": "1.0",
            "type": constants.POST_MESSAGE_SENT,
            "source": source,
            "id": event_id,
            "data": {"id": message_id, "room": {"id": room}, "sender": {"id": sender}, "text": text, "createdAt": "2026-12-04T10:00:00Z"},
        }
    ).encode()


@dataclass(frozen=True)
class Plan:
    """What the handler stages for one event (by its message text): a record id, an association id, data."""

    record_id: str = "rec"
    association_id: str = "assoc"
    data: Any = None


class Planned(App):
    """Stages what the test planned for the event, and keys a record by the room as handlers do."""

    plans: ClassVar[dict[str, Plan]] = {}

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        plan = self.plans.get(message.text or "", Plan())
        data = {"event": message.id} if plan.data is None else plan.data
        await persistence.update(plan.record_id, data, upsert=True)
        await persistence.update_by_association(Association(AssociationModel.MISC, plan.association_id), data, upsert=True)
        await persistence.update_by_association(Association(AssociationModel.ROOM, message.room.id), {"seen": True}, upsert=True)


class Bystander(App):
    """Writes a little for every event, never anything refused."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        await persistence.update_by_association(Association(AssociationModel.MESSAGE, message.id), {"ok": True}, upsert=True)


class Quoting(App):
    """Fails with the message's own text in its error, as handlers often do."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        raise ValueError(f"cannot handle {json.loads(message.text or '')!s}")


class Lane:
    """One partition of a migrated store, claimed, and a dispatcher over the given apps."""

    def __init__(self, store: Store, fence: Fence, apps: Sequence[App]) -> None:
        self.store, self.fence, self.apps = store, fence, list(apps)
        self.http = Http(HttpSettings())
        processing = ProcessingSettings(handler_max_attempts=2, backoff_initial_ms=0, backoff_max_ms=0, conflict_max_attempts=3)
        self.dispatcher = Dispatcher(self.apps, store, self.http, Topics(DLQ, f"{TOPIC}.cmd"), processing)
        self.next_offset = 0

    async def deliver(self, values: Sequence[bytes]) -> tuple[BatchResult, list[RawRecord]]:
        records = [RawRecord(TOPIC, 0, self.next_offset + n, 0, b"k", value, ()) for n, value in enumerate(values)]
        self.next_offset += len(records)
        return await self.dispatcher.dispatch(records, self.fence), records

    async def dead_letters(self) -> dict[int, dict[str, str]]:
        """The dead letters by the offset they came from, with their rc-dlq-* headers."""
        found = {}
        for _, message in await self.store.outbox_messages():
            if message.topic == DLQ:
                headers = {name: value.decode() for name, value in message.headers if name.startswith("rc-dlq-")}
                found[int(headers[constants.DLQ_OFFSET])] = headers
        return found

    async def only_dead_letter(self, record: RawRecord, stage: str, error_type: str) -> dict[str, str]:
        """The one dead letter there is, of ``record``, by the app "planned" at ``stage``; its headers."""
        letters = await self.dead_letters()
        assert set(letters) == {record.offset}
        letter = letters[record.offset]
        assert (letter[constants.DLQ_STAGE], letter[constants.DLQ_APP], letter[constants.DLQ_ERROR_TYPE]) == (stage, "planned", error_type)
        return letter

    async def stored_offset(self) -> int | None:
        return (await self.store.stored_offsets(self.fence.group_id, TOPIC)).get(0)


@pytest.fixture
async def lane(store: Store) -> AsyncIterator[Lane]:
    claims = await store.claim("poison-group", TOPIC, [0], "poison-test")
    lane = Lane(store, claims[0].fence, [instantiate(Planned, "planned", {})])
    yield lane
    await lane.http.aclose()


@pytest.fixture(autouse=True)
def _no_plans() -> Iterator[None]:
    Planned.plans = {}
    yield
    Planned.plans = {}


# -- the limits ------------------------------------------------------------------------------------


class TestLimits:
    def test_the_schema_sizes_its_columns_with_the_limits(self) -> None:
        """Every id column the checks guard is exactly as long as its limit."""
        lengths = {
            "records.app_id": limits.APP_ID_MAX,
            "records.id": limits.RECORD_ID_MAX,
            "record_associations.association": limits.ASSOCIATION_MAX,
            "record_associations.record_id": limits.RECORD_ID_MAX,
            "key_versions.key": limits.VERSION_KEY_MAX,
            "processed_events.source": limits.EVENT_SOURCE_MAX,
            "processed_events.event_id": limits.EVENT_ID_MAX,
        }
        for name, limit in lengths.items():
            table, column = name.split(".")
            assert schema.metadata.tables[table].c[column].type.length == limit, name
        # A version key holds "as:" and the longest association, or "id:" and the longest record id.
        assert 3 + max(limits.ASSOCIATION_MAX, limits.RECORD_ID_MAX) <= limits.VERSION_KEY_MAX

    def test_text_problem_names_length_nul_and_surrogates(self) -> None:
        assert limits.text_problem("x" * 200, 200) is None
        assert limits.text_problem("é" * 200, 200) is None  # characters, not bytes
        assert "201 characters long, over the limit of 200" in (limits.text_problem("x" * 201, 200) or "")
        assert "NUL character at 1" in (limits.text_problem("a\x00", 200) or "")
        assert "lone surrogate" in (limits.text_problem(json.loads('"\\udcff"'), 200) or "")


# -- the decoder -----------------------------------------------------------------------------------


class TestDecoder:
    @pytest.mark.parametrize(
        ("value", "reason"),
        [
            (event("e" * 501), "id is 501 characters long, over the limit of 500"),
            (event("e", source="s" * 501), "source is 501 characters long, over the limit of 500"),
            (event("e", message_id="m" * 201), "data.id is 201 characters long, over the limit of 200"),
            (event("e", room="r\x00"), "data.room.id holds a NUL character at 1"),
            (event("e", sender="u\x00x"), "data.sender.id holds a NUL character at 1"),
            (event("e\x00"), "id holds a NUL character"),
        ],
        ids=["event-id-501", "source-501", "message-id-201", "room-nul", "sender-nul", "event-id-nul"],
    )
    def test_ids_the_database_cannot_store_are_refused(self, value: bytes, reason: str) -> None:
        with pytest.raises(DecodeError) as caught:
            decode(RawRecord(TOPIC, 0, 0, 0, None, value))
        assert reason in caught.value.reason

    def test_ids_at_the_limits_are_accepted(self) -> None:
        decoded = decode(RawRecord(TOPIC, 0, 0, 0, None, event("é" * 500, source="s" * 500, message_id="m" * 200, room="r" * 200)))
        assert (len(decoded.id), len(decoded.source)) == (500, 500)

    def test_a_lone_surrogate_escape_is_refused(self) -> None:
        """orjson refuses "\\udcff" outright, as the worker never sees such a string."""
        with pytest.raises(DecodeError, match="not JSON"):
            decode(RawRecord(TOPIC, 0, 0, 0, None, event("e", room=json.loads('"\\udcff"'))))

    @pytest.mark.parametrize("bad", ["long-id", "nul-room"])
    async def test_producer_poison_is_dead_lettered_at_decode_and_the_rest_commit(self, lane: Lane, bad: str) -> None:
        """Before: on PostgreSQL the commit failed (22001 / 22021), taken for an outage and retried for ever."""
        poison = event("e" * 501) if bad == "long-id" else event("e2", room="room\x00")
        result, records = await lane.deliver([event("e1"), poison, event("e3")])
        letters = await lane.dead_letters()
        assert set(letters) == {records[1].offset}
        assert letters[records[1].offset][constants.DLQ_STAGE] == "decode"
        assert await lane.store.processed_count("planned") == 2
        assert await lane.stored_offset() == result.next_offset == records[-1].offset + 1


# -- staging a write -------------------------------------------------------------------------------


class TestStaging:
    @pytest.mark.parametrize(
        ("plan", "problem"),
        [
            (Plan(association_id=json.loads('"\\udcff"')), "association 'misc:\\udcff' is not encodable as UTF-8"),
            (Plan(association_id="a" * 596), "association 'misc:aaaa"),
            (Plan(association_id="a\x00"), "holds a NUL character"),
            (Plan(record_id="r" * 201), "record id 'rrrr"),
            (Plan(record_id=json.loads('"x\\ud800"')), "record id 'x\\ud800' is not encodable as UTF-8"),
            (Plan(data={"k": json.loads('"\\udcff"')}), "surrogates not allowed"),
            (Plan(data={json.loads('"\\udcff"'): 1}), "surrogates not allowed"),
            (Plan(data={"a": [1, {"b": math.nan}]}), "data.a[1].b is nan"),
            (Plan(data={"a": -math.inf}), "data.a is -inf"),
        ],
        ids=["association-surrogate", "association-601", "association-nul", "record-id-201", "record-id-surrogate", "data-surrogate",
             "data-key-surrogate", "data-nan", "data-infinity"],
    )  # fmt: skip
    async def test_a_value_that_cannot_be_stored_dead_letters_its_event_only(self, lane: Lane, plan: Plan, problem: str) -> None:
        """Before (surrogate association on SQLite): UnicodeEncodeError at commit, the batch retried for ever."""
        Planned.plans = {"poison": plan}
        result, records = await lane.deliver([event("e1"), event("e2", text="poison"), event("e3")])
        letter = await lane.only_dead_letter(records[1], "handler", "InvalidDataError")
        assert "app 'planned'" in letter[constants.DLQ_REASON]
        assert problem in letter[constants.DLQ_REASON]
        assert await lane.store.processed_count("planned") == 2
        assert await lane.stored_offset() == result.next_offset == records[-1].offset + 1

    async def test_an_error_quoting_a_lone_surrogate_is_dead_lettered_escaped(self, store: Store) -> None:
        """Before: encoding the dead letter's reason raised UnicodeEncodeError, and the batch failed for ever."""
        claims = await store.claim("poison-group", TOPIC, [0], "poison-test")
        lane = Lane(store, claims[0].fence, [instantiate(Quoting, "planned", {})])
        try:
            _, records = await lane.deliver([event("e1", text=json.dumps("\udcff"))])
            letter = await lane.only_dead_letter(records[0], "handler", "ValueError")
        finally:
            await lane.http.aclose()
        assert letter[constants.DLQ_REASON] == "ValueError: cannot handle \\udcff"

    async def test_a_nul_inside_record_data_is_stored_and_read_back(self, lane: Lane) -> None:
        """Data is JSON text: a NUL in a string is written escaped, which both backends store."""
        Planned.plans = {"nul": Plan(data={"k\x00": "v\x00w"})}
        await lane.deliver([event("e1", text="nul")])
        assert await lane.dead_letters() == {}
        [stored] = (await lane.store.load_by_ids([], "planned", ["rec"]))[1]
        assert json.loads(stored.data) == {"k\x00": "v\x00w"}

    def test_nan_and_infinity_are_refused_not_stored_as_null(self) -> None:
        with pytest.raises(InvalidDataError, match=r"app 'x': .*data\.score is nan"):
            encode_data({"score": math.nan}, "x")
        with pytest.raises(InvalidDataError, match=r"data\.l\[0\] is inf"):
            encode_data({"l": [math.inf, None]})
        assert encode_data({"a": None, "b": 1.5}) == b'{"a":null,"b":1.5}'

    async def test_reading_by_no_associations_is_invalid_data(self, store: Store) -> None:
        """An empty list is a mistake of the caller, named as such (the issue saw IndexError; main already said InvalidDataError)."""
        with pytest.raises(InvalidDataError, match="at least one association"):
            await UnitOfWork(store).read_by_associations("app", [])


# -- what only the database refuses ----------------------------------------------------------------


class TestCommitIsolation:
    @pytest.fixture
    def unchecked(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Switch the staging check of associations off, as for a value it does not know to refuse."""
        monkeypatch.setattr(unit_module, "check_associations", lambda app_id, associations: None, raising=False)

    @pytest.mark.usefixtures("unchecked")
    async def test_the_refused_event_is_bisected_out_and_the_rest_commit(self, lane: Lane, database_url: str) -> None:
        """One event in eight stages a value the database refuses: one dead letter with its message, seven committed."""
        # PostgreSQL refuses the length (22001), SQLite (no lengths) the surrogate when binding it.
        poison = Plan(association_id="a" * 700) if database_url.startswith("postgresql") else Plan(association_id=json.loads('"\\udcff"'))
        Planned.plans = {"poison": poison}
        values = [event(f"e{n}", text="poison" if n == 5 else "", room=f"room{n}") for n in range(8)]
        result, records = await lane.deliver(values)
        letter = await lane.only_dead_letter(records[5], "commit", "DataError")
        expected = "value too long for type character varying" if database_url.startswith("postgresql") else "surrogates not allowed"
        assert expected in letter[constants.DLQ_REASON]
        assert await lane.store.processed_count("planned") == 7
        rooms = {a for r in await lane.store.app_records("planned") for a in r.associations if a.startswith("room:")}
        assert rooms == {f"room:room{n}" for n in range(8) if n != 5}
        assert await lane.stored_offset() == result.next_offset == records[-1].offset + 1
        assert (result.outcomes["planned", "processed"], result.outcomes["planned", "dead_lettered"], result.dead_lettered) == (7, 1, 0)

    @pytest.mark.usefixtures("unchecked")
    async def test_with_several_apps_only_the_refused_app_is_dead_lettered(self, store: Store) -> None:
        """The other app's run of the same event commits; the event is not run again by it on redelivery."""
        claims = await store.claim("poison-group", TOPIC, [0], "poison-test")
        lane = Lane(store, claims[0].fence, [instantiate(Bystander, "bystander", {}), instantiate(Planned, "planned", {})])
        Planned.plans = {"poison": Plan(association_id=json.loads('"\\udcff"'))}
        try:
            _, records = await lane.deliver([event("e0"), event("e1", text="poison"), event("e2")])
            letters = await lane.dead_letters()
            assert set(letters) == {records[1].offset}
            assert letters[records[1].offset][constants.DLQ_APP] == "planned"
            assert await store.processed_count("bystander") == 3
            assert await store.processed_count("planned") == 2
            assert await lane.stored_offset() == records[-1].offset + 1
            # Redelivered (a crash before Kafka's commit): all duplicates but the dead-lettered one.
            again = await lane.dispatcher.dispatch(records, lane.fence)
            assert again.duplicates == 5
        finally:
            await lane.http.aclose()

    @pytest.mark.usefixtures("unchecked")
    async def test_a_shared_unit_of_several_partitions_leaves_the_refused_value_to_its_partition(
        self, lane: Lane, database_url: str
    ) -> None:
        """The hot path runs two partitions' batches as one unit: the refusal fails that commit, then each partition runs alone.

        The partition without the poison commits whole; the other bisects it out, as a lone lane does.
        """
        poison = Plan(association_id="a" * 700) if database_url.startswith("postgresql") else Plan(association_id=json.loads('"\\udcff"'))
        Planned.plans = {"poison": poison}
        fences = {0: lane.fence, 1: (await lane.store.claim("poison-group", TOPIC, [1], "poison-test"))[1].fence}
        batches = {
            p: [
                RawRecord(TOPIC, p, n, 0, b"k", event(f"p{p}e{n}", text="poison" if (p, n) == (0, 2) else "", room=f"r{p}{n}"), ())
                for n in range(4)
            ]
            for p in (0, 1)
        }
        combiner = Combiner(lane.dispatcher)
        with capture_logs() as logs:
            # Both batches wait for the same turn, so they are taken together as one unit.
            async with combiner._turn:
                tasks = [asyncio.create_task(combiner.dispatch(batches[p], fences[p], snapshot=Snapshot())) for p in (0, 1)]
                await asyncio.sleep(0)
            results = await asyncio.gather(*tasks)
        assert [(line["partitions"], line["error_type"]) for line in logs if line["event"] == "shared_unit_failed"] == [(2, "DataError")]
        letters = await lane.dead_letters()
        assert set(letters) == {2}
        assert letters[2][constants.DLQ_STAGE] == "commit"
        assert await lane.store.processed_count("planned") == 7
        assert [r.next_offset for r in results] == [4, 4]
        assert await lane.store.stored_offsets("poison-group", TOPIC) == {0: 4, 1: 4}

    def test_a_refused_value_is_a_data_error_and_an_outage_is_not(self) -> None:
        """Class 22/23 and encoding errors are the data's; a connection refused stays a retriable PersistenceError."""
        with pytest.raises(DataError) as refused, translate("committing"):
            "\udcff".encode()
        assert refused.value.retriable is False
        with pytest.raises(PersistenceError) as outage, translate("committing"):
            raise ConnectionRefusedError(111, "Connection refused")
        assert not isinstance(outage.value, DataError)
        assert outage.value.retriable is True


# -- the property ----------------------------------------------------------------------------------

POISON_CHARS = ["\x00", "\udcff", "\ud800"]


def _near(limit: int) -> st.SearchStrategy[str]:
    """Strings around ``limit`` characters: plain, two-byte and astral (two UTF-16 escapes in JSON)."""
    return st.builds(lambda n, c: c * n, st.integers(limit - 1, limit + 1), st.sampled_from(["x", "é", "\U0001d11e"]))


def ids(limit: int) -> st.SearchStrategy[str]:
    """Any Unicode, lengths around ``limit``, and NUL or a lone surrogate somewhere in it."""
    plain = st.text(min_size=1, max_size=10) | _near(limit)
    poisoned = st.builds(lambda text, at, bad: text[:at] + bad + text[at:], plain, st.integers(0, 12), st.sampled_from(POISON_CHARS))
    return st.one_of(plain, plain, poisoned)


def storable(value: str, limit: int) -> bool:
    """The oracle, independent of the worker's checks: what the schema can hold."""
    return 0 < len(value) <= limit and "\x00" not in value and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)


json_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats() | st.text(max_size=8) | st.sampled_from(POISON_CHARS),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(POISON_CHARS), children, max_size=3)
    ),
    max_leaves=8,
)


def data_storable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return all(data_storable(v) for v in value)
    if isinstance(value, dict):
        return all(data_storable(k) and data_storable(v) for k, v in value.items())
    return True


@dataclass(frozen=True)
class Case:
    """One event: what the producer sent and what its handler stages."""

    event_id: str
    source: str
    message_id: str
    room: str
    sender: str
    record_id: str
    association_id: str
    data: dict[str, Any]

    def storable(self) -> bool:
        return (
            storable(self.event_id, limits.EVENT_ID_MAX)
            and storable(self.source, limits.EVENT_SOURCE_MAX)
            and all(storable(v, limits.MESSAGE_REF_ID_MAX) for v in (self.message_id, self.room, self.sender, self.record_id))
            and storable(f"misc:{self.association_id}", limits.ASSOCIATION_MAX)
            and data_storable(self.data)
        )


def valid_ids(limit: int) -> st.SearchStrategy[str]:
    """Ids the schema can hold: any Unicode but NUL and surrogates, up to exactly ``limit``."""
    text = st.text(st.characters(exclude_characters="\x00"), min_size=1, max_size=10)
    return text | st.builds(lambda n, c: c * n, st.integers(limit - 1, limit), st.sampled_from(["x", "é", "\U0001d11e"]))


valid_data = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
LIMITS = {
    "event_id": limits.EVENT_ID_MAX,
    "source": limits.EVENT_SOURCE_MAX,
    "message_id": limits.MESSAGE_REF_ID_MAX,
    "room": limits.MESSAGE_REF_ID_MAX,
    "sender": limits.MESSAGE_REF_ID_MAX,
    "record_id": limits.RECORD_ID_MAX,
    "association_id": limits.ASSOCIATION_MAX - len("misc:"),
}


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """One value, or every value, of an event drawn from anything; the others storable, so every stage is reached."""
    target = draw(st.sampled_from([None, "all", "data", *LIMITS]))
    values = {name: draw(ids(limit) if target in (name, "all") else valid_ids(limit)) for name, limit in LIMITS.items()}
    data_values = json_data if target in ("data", "all") else valid_data
    keys = st.text(max_size=6) | st.sampled_from(POISON_CHARS) if target in ("data", "all") else st.text(max_size=6)
    return Case(**values, data=draw(st.dictionaries(keys, data_values, max_size=3)))


class PropertyHarness:
    """A lane of its own event loop, so Hypothesis can drive it from a plain test."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.store = Store.from_settings(PersistenceSettings(url=url))  # type: ignore[arg-type]
        self.loop.run_until_complete(self.store.upgrade())
        claims = self.loop.run_until_complete(self.store.claim("poison-group", TOPIC, [0], "poison-property"))
        self.lane = Lane(self.store, claims[0].fence, [instantiate(Planned, "planned", {})])
        self.serial = 0

    def run(self, batch: list[Case]) -> tuple[BatchResult, list[RawRecord], dict[int, dict[str, str]], set[tuple[str, str, str]]]:
        values = []
        for case in batch:
            self.serial += 1
            text = f"case-{self.serial}"
            Planned.plans[text] = Plan(case.record_id, case.association_id, case.data)
            values.append(
                event(case.event_id, source=case.source, message_id=case.message_id, room=case.room, sender=case.sender, text=text)
            )
        result, records = self.loop.run_until_complete(self.lane.deliver(values))
        letters = self.loop.run_until_complete(self.lane.dead_letters())
        markers = [("planned", case.source, case.event_id) for case in batch if case.storable()]
        done = self.loop.run_until_complete(self.store.processed(markers))
        return result, records, letters, done

    def processed_before(self, batch: list[Case]) -> set[tuple[str, str, str]]:
        """The markers of ``batch`` already in the database (from earlier examples): those events are duplicates."""
        markers = [
            ("planned", case.source, case.event_id)
            for case in batch
            if storable(case.source, limits.EVENT_SOURCE_MAX) and storable(case.event_id, limits.EVENT_ID_MAX)
        ]
        return self.loop.run_until_complete(self.store.processed(markers))

    def close(self) -> None:
        self.loop.run_until_complete(self.lane.http.aclose())
        self.loop.run_until_complete(self.store.close())
        self.loop.close()


def check_property(harness: PropertyHarness, batch: list[Case]) -> None:
    """Each event processed or dead-lettered with a reason, the storable ones processed, the offset at the batch's end."""
    before = harness.processed_before(batch)
    result, records, letters, done = harness.run(batch)
    assert result.next_offset == records[-1].offset + 1
    assert harness.loop.run_until_complete(harness.lane.stored_offset()) == result.next_offset
    for case, record in zip(batch, records, strict=True):
        marker = ("planned", case.source, case.event_id)
        if marker in before:
            continue  # the same event again (from an earlier example, or earlier in this batch): a duplicate
        before.add(marker)
        if case.storable():
            assert record.offset not in letters, letters.get(record.offset)
            assert marker in done
        else:
            letter = letters.get(record.offset)
            assert letter is not None, case
            assert letter[constants.DLQ_STAGE] in {"decode", "handler", "commit"}
            assert letter[constants.DLQ_REASON]
            note_event(letter[constants.DLQ_STAGE])  # Hypothesis' statistics show which stages the examples reached


# One lane serves every example of a test (its offsets and markers carry over, duplicates are
# judged from the database), so the function-scoped fixture is meant.
PROPERTY_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
}


@pytest.fixture
def harness(database_url: str) -> Iterator[PropertyHarness]:
    harness = PropertyHarness(database_url)
    yield harness
    harness.close()


class TestProperty:
    @settings(max_examples=60, **PROPERTY_SETTINGS)
    @given(batch=st.lists(cases(), min_size=1, max_size=4))
    def test_each_event_is_processed_or_dead_lettered_and_the_partition_moves_on(self, harness: PropertyHarness, batch: list[Case]) -> None:
        """Storable events commit whatever their neighbours carry; the others are dead-lettered with a reason."""
        check_property(harness, batch)


@pytest.mark.postgres
class TestPropertyAtCommit:
    """The same property with the staging checks of ids off: PostgreSQL refuses at commit (or at a read), bisection finds each."""

    @pytest.fixture
    def harness(self, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[PropertyHarness]:
        # SQLite enforces no lengths, so only PostgreSQL refuses every unstorable id itself.
        monkeypatch.setattr(unit_module, "check_associations", lambda app_id, associations: None)
        monkeypatch.setattr(unit_module, "check_record_id", lambda app_id, record_id: None)
        harness = PropertyHarness(postgres_url)
        yield harness
        harness.close()

    @settings(max_examples=30, **PROPERTY_SETTINGS)
    @given(batch=st.lists(cases(), min_size=1, max_size=6))
    def test_each_event_is_processed_or_dead_lettered_and_the_partition_moves_on(self, harness: PropertyHarness, batch: list[Case]) -> None:
        """Storable events commit whatever their neighbours carry; the others are dead-lettered with a reason."""
        check_property(harness, batch)


# -- end to end: the lane of a running worker ------------------------------------------------------


class Poisoner(App):
    """Stages an association with a lone surrogate for the message ``poison``: what the issue saw retried for ever."""

    async def execute_post_message_sent(
        self, message: Message, read: IRead, http: IHttp, persistence: IPersistence, modify: IModify
    ) -> None:
        name = json.loads('"\\udcff"') if message.id == "poison" else message.id
        await persistence.create_with_association({"seen": True}, Association(AssociationModel.MISC, name))


@pytest.mark.kafka
class TestRunningWorker:
    async def test_a_value_refused_at_commit_is_dead_lettered_and_the_partition_moves_on(
        self, topics: TopicSet, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Staging checks off, so SQLite refuses the surrogate at commit: before, 12+ batch_failed and nothing committed."""

        monkeypatch.setattr(unit_module, "check_associations", lambda app_id, associations: None, raising=False)
        key = b"one-partition"
        records = [(key, event_value(f"m{n}" if n != 4 else "poison", f"r{n % 2}"), STRUCTURED) for n in range(10)]
        await produce(topics.bootstrap, topics.topic, records)
        apps = [message_count(), instantiate(Poisoner, "poisoner", {})]
        async with running(settings_for(topics, sqlite_url), apps):
            await until(counted(sqlite_url, room_counts(records)), 60, "every event counted by message-count")
            [letter] = await dead_letters(topics, at_least=1)
            await until(lambda: _caught_up(topics), 60, "the group's offsets at the end")
        assert letter.header(constants.DLQ_STAGE) == b"commit"
        assert letter.header(constants.DLQ_APP) == b"poisoner"
        assert b"surrogates not allowed" in (letter.header(constants.DLQ_REASON) or b"")
        async with store_for(sqlite_url) as store:
            assert await store.processed_count("poisoner") == 9
            assert await store.processed_count("message-count") == 10


async def _caught_up(topics: TopicSet) -> bool:
    return bool(nonempty(await group_offsets(topics)) == nonempty(await end_offsets(topics)))
