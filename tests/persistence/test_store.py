"""The persistence API handlers see, call by call, and the version checks behind it, on SQLite and PostgreSQL.

Every test builds the accessors a handler is handed (PersistenceReader / PersistenceWriter over a
UnitOfWork over the `store` fixture) and commits with Store.commit, as the dispatcher does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from sqlalchemy import event, select

from worker.apps.accessors import Record
from worker.apps.persistence import PersistenceReader, PersistenceWriter
from worker.errors import FencedError, InvalidDataError, RecordNotFoundError, VersionConflict
from worker.persistence.associations import Association, AssociationModel
from worker.persistence.keys import guard_key
from worker.persistence.schema import key_versions
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Fence, Store
from worker.persistence.unit import UnitOfWork

APP = "app-a"
OTHER_APP = "app-b"
ROOM = Association(AssociationModel.ROOM, "r1")

USER = Association(AssociationModel.USER, "u1")
TOTAL = Association(AssociationModel.MISC, "count")
NOBODY = Association(AssociationModel.FILE, "nobody-has-this")


class NoLoader:
    """A unit's loader that fails every read: what a unit reads must come from its snapshot."""

    async def load_by_ids(self, *_args: object) -> Any:
        raise AssertionError("read by id from the database")

    async def load_by_associations(self, *_args: object) -> Any:
        raise AssertionError("read by association from the database")

    async def processed(self, *_args: object) -> Any:
        raise AssertionError("read processed markers from the database")


Call = Callable[[PersistenceReader, PersistenceWriter], Awaitable[Any]]


class Session:
    """One unit of work seen through one app's accessors, as one handler run sees it."""

    def __init__(self, store: Store, app: str = APP) -> None:
        self.store = store
        self.unit = UnitOfWork(store)
        self.read = PersistenceReader(self.unit, app)
        self.write = PersistenceWriter(self.unit, app)

    async def commit(self, fence: Fence | None = None, next_offset: int | None = None) -> None:
        await self.store.commit(self.unit, fence, next_offset)


async def run(store: Store, call: Call, app: str = APP) -> Any:
    """Run ``call`` in a fresh unit of work of ``app`` and commit it; returns what the call returned."""
    session = Session(store, app)
    result = await call(session.read, session.write)
    await session.commit()
    return result


async def create(store: Store, data: dict[str, Any], *associations: Association, app: str = APP) -> str:
    """Commit one new record; returns its id."""
    record_id: str = await run(store, lambda _r, w: w.create_with_associations(data, list(associations)), app)
    return record_id


async def key_versions_of(store: Store, app: str = APP) -> dict[str, int]:
    """Every version row of ``app``, by key, as the database holds them."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(key_versions.c.key, key_versions.c.version).where(key_versions.c.app_id == app))
        return {row.key: row.version for row in rows}


async def commit_marker(store: Store, marker: tuple[str, str, str]) -> None:
    """Commit a unit that records ``marker`` as processed, as the dispatcher does."""
    session = Session(store, marker[0])
    session.unit.mark_processed(marker)
    await session.commit()


async def state(store: Store, app: str = APP) -> dict[str, tuple[dict[str, Any], frozenset[str], int]]:
    """Every committed record of ``app``: id -> (data, associations, version)."""
    import json

    return {r.id: (json.loads(r.data), frozenset(r.associations), r.version) for r in await store.app_records(app)}


async def datas(store: Store, app: str = APP) -> list[dict[str, Any]]:
    """The committed data of every record of ``app``, sorted by repr for comparison."""
    return sorted((data for data, _, _ in (await state(store, app)).values()), key=repr)


class TestAssociations:
    @pytest.mark.parametrize(
        ("member", "wire_name"),
        [
            ("ROOM", "room"),
            ("DISCUSSION", "discussion"),
            ("MESSAGE", "message"),
            ("LIVECHAT_MESSAGE", "livechat-message"),
            ("USER", "user"),
            ("FILE", "file"),
            ("MISC", "misc"),
            ("VIDEO_CONFERENCE", "video-conference"),
        ],
    )
    def test_model_member_has_the_apps_engine_wire_name(self, member: str, wire_name: str) -> None:
        """Each of the Apps-Engine's models is a member whose value is its wire name."""
        assert AssociationModel[member].value == wire_name

    def test_model_has_exactly_the_eight_apps_engine_models(self) -> None:
        """No model beyond the Apps-Engine's eight."""
        assert len(AssociationModel) == 8

    def test_wire_name_is_accepted_as_the_model(self) -> None:
        """Association("room", id) is the same as Association(AssociationModel.ROOM, id)."""
        assert Association("room", "r1") == ROOM  # type: ignore[arg-type]
        assert Association("room", "r1").model is AssociationModel.ROOM  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("model", "ident", "message"),
        [
            ("channel", "r1", "unknown association model"),
            ("ROOM", "r1", "unknown association model"),
            (AssociationModel.ROOM, "", "non-empty string"),
            (AssociationModel.ROOM, 7, "non-empty string"),
            (AssociationModel.ROOM, None, "non-empty string"),
        ],
        ids=["unknown-model", "member-name-not-wire-name", "empty-id", "int-id", "none-id"],
    )
    def test_invalid_association_is_refused_at_construction(self, model: Any, ident: Any, message: str) -> None:
        """An unknown model or an empty/non-string id raises InvalidDataError naming the problem."""
        with pytest.raises(InvalidDataError, match=message):
            Association(model, ident)

    def test_unknown_model_error_lists_the_allowed_models(self) -> None:
        """The error for an unknown model names every allowed wire name."""
        with pytest.raises(InvalidDataError) as caught:
            Association("channel", "r1")  # type: ignore[arg-type]
        assert all(m.value in str(caught.value) for m in AssociationModel)

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("misc:message-count", Association(AssociationModel.MISC, "message-count")),
            ("room:a:b", Association(AssociationModel.ROOM, "a:b")),
        ],
    )
    def test_parse_reads_model_colon_id(self, text: str, expected: Association) -> None:
        """parse("model:id") splits at the first colon, and str() writes it back."""
        parsed = Association.parse(text)
        assert parsed == expected
        assert str(parsed) == text

    @pytest.mark.parametrize("text", ["misc", "misc:", "nope:x"])
    def test_parse_refuses_malformed_text(self, text: str) -> None:
        """Text without a colon, an id or a known model raises InvalidDataError."""
        with pytest.raises(InvalidDataError):
            Association.parse(text)


class TestCreate:
    @pytest.mark.parametrize(
        ("call", "associations"),
        [
            (lambda w, d: w.create(d), frozenset()),
            (lambda w, d: w.create_with_association(d, ROOM), frozenset({"room:r1"})),
            (lambda w, d: w.create_with_associations(d, [ROOM, USER]), frozenset({"room:r1", "user:u1"})),
            (lambda w, d: w.create_with_associations(d, [ROOM, ROOM]), frozenset({"room:r1"})),
            (lambda w, d: w.create_with_associations(d, []), frozenset()),
        ],
        ids=["create", "create_with_association", "create_with_associations", "repeated-association", "no-associations"],
    )
    async def test_create_returns_the_id_of_the_stored_record(self, store: Store, call: Any, associations: frozenset[str]) -> None:
        """Each create form returns a new id under which the data and associations are stored."""
        record_id = await run(store, lambda _r, w: call(w, {"n": 1}))
        assert isinstance(record_id, str)
        assert record_id
        assert await state(store) == {record_id: ({"n": 1}, associations, 1)}

    async def test_each_create_returns_a_different_id(self, store: Store) -> None:
        """Two creates with the same data make two records."""
        first = await create(store, {"n": 1}, ROOM)
        second = await create(store, {"n": 1}, ROOM)
        assert first != second
        assert set(await state(store)) == {first, second}

    @pytest.mark.parametrize(
        "data",
        [
            {},
            {"text": "héllo ☃ 👋", "empty": ""},
            {"numbers": [0, -1, 2**62, 2.5, -1e-300], "flags": [True, False, None]},
            {"deep": {"a": {"b": {"c": [{"d": []}]}}}},
        ],
        ids=["empty", "unicode", "numbers", "nested"],
    )
    async def test_json_data_round_trips_unchanged(self, store: Store, data: dict[str, Any]) -> None:
        """Any JSON object is stored and read back equal."""
        record_id = await create(store, data)
        assert await run(store, lambda r, _w: r.read(record_id)) == data


class TestRead:
    async def _records(self, store: Store) -> dict[str, str]:
        return {
            "both": await create(store, {"name": "both"}, ROOM, USER),
            "room": await create(store, {"name": "room"}, ROOM),
            "user": await create(store, {"name": "user"}, USER),
            "none": await create(store, {"name": "none"}),
        }

    async def test_read_returns_the_data_of_the_record(self, store: Store) -> None:
        """read(id) returns the record's data."""
        ids = await self._records(store)
        assert await run(store, lambda r, _w: r.read(ids["both"])) == {"name": "both"}

    async def test_read_of_a_missing_id_returns_none(self, store: Store) -> None:
        """read(id) of an id nobody created returns None."""
        await self._records(store)
        assert await run(store, lambda r, _w: r.read("no-such-id")) is None

    @pytest.mark.parametrize(
        ("call", "expected"),
        [
            (lambda r: r.read_by_association(ROOM), {"both", "room"}),
            (lambda r: r.read_by_association(USER), {"both", "user"}),
            (lambda r: r.read_by_associations([ROOM, USER]), {"both"}),
            (lambda r: r.read_by_associations([USER, ROOM]), {"both"}),
            (lambda r: r.read_by_associations([ROOM, ROOM]), {"both", "room"}),
            (lambda r: r.read_by_associations([ROOM]), {"both", "room"}),
            (lambda r: r.read_by_associations([ROOM, NOBODY]), set()),
            (lambda r: r.read_by_association(NOBODY), set()),
        ],
        ids=["room", "user", "room+user", "user+room", "room+room", "list-of-one", "room+unknown", "unknown"],
    )
    async def test_association_reads_return_records_having_all_associations(self, store: Store, call: Any, expected: set[str]) -> None:
        """read_by_association(s) returns the data of exactly the records having every association given."""
        await self._records(store)
        found = await run(store, lambda r, _w: call(r))
        assert isinstance(found, list)
        assert sorted(d["name"] for d in found) == sorted(expected)

    @pytest.mark.parametrize(
        ("call", "expected"),
        [
            (lambda r: r.read_records_by_association(ROOM), {"both", "room"}),
            (lambda r: r.read_records_by_associations([ROOM, USER]), {"both"}),
            (lambda r: r.read_records_by_associations([NOBODY]), set()),
        ],
        ids=["room", "room+user", "unknown"],
    )
    async def test_versioned_association_reads_return_ids_versions_and_associations(
        self, store: Store, call: Any, expected: set[str]
    ) -> None:
        """read_records_by_association(s) returns Record(id, data, version, associations) of the same records."""
        ids = await self._records(store)
        committed = await state(store)
        found = await run(store, lambda r, _w: call(r))
        assert {record.data["name"] for record in found} == expected
        for record in found:
            assert isinstance(record, Record)
            assert record.id == ids[record.data["name"]]
            data, associations, version = committed[record.id]
            assert (record.data, record.version) == (data, version)
            assert {str(a) for a in record.associations} == associations
            assert all(isinstance(a, Association) for a in record.associations)

    async def test_read_record_returns_id_data_version_and_associations(self, store: Store) -> None:
        """read_record(id) returns the versioned form of one record."""
        ids = await self._records(store)
        record = await run(store, lambda r, _w: r.read_record(ids["both"]))
        assert record == Record(ids["both"], {"name": "both"}, 1, (ROOM, USER))

    async def test_read_record_of_a_missing_id_returns_none(self, store: Store) -> None:
        """read_record(id) of an id nobody created returns None."""
        assert await run(store, lambda r, _w: r.read_record("no-such-id")) is None

    async def test_changing_returned_data_changes_nothing_stored(self, store: Store) -> None:
        """The data a read returns is a copy: changing it affects neither later reads nor the commit."""
        record_id = await create(store, {"n": 1, "items": [1]}, ROOM)
        session = Session(store)
        first = await session.read.read(record_id)
        assert first is not None
        first["n"] = 99
        first["items"].append(2)
        (by_association,) = await session.read.read_by_association(ROOM)
        by_association["n"] = 98
        assert await session.read.read(record_id) == {"n": 1, "items": [1]}
        await session.commit()
        assert await datas(store) == [{"n": 1, "items": [1]}]

    @pytest.mark.parametrize(
        "call",
        [
            lambda r: r.read_by_associations(ROOM),
            lambda r: r.read_by_associations("room:r1"),
            lambda r: r.read_records_by_associations(ROOM),
        ],
        ids=["read_by_associations", "read_by_associations-str", "read_records_by_associations"],
    )
    async def test_a_single_association_where_a_list_is_expected_is_refused(self, store: Store, call: Any) -> None:
        """Passing one Association (or a string) to a *_by_associations read raises TypeError naming the fix."""
        with pytest.raises(TypeError, match="by_association"):
            await call(Session(store).read)

    async def test_an_empty_association_list_is_refused(self, store: Store) -> None:
        """read_by_associations([]) would match everything: InvalidDataError instead."""
        with pytest.raises(InvalidDataError, match="at least one association"):
            await Session(store).read.read_by_associations([])


class TestUpdate:
    async def test_update_replaces_the_data_and_keeps_the_associations(self, store: Store) -> None:
        """update(id, data) returns the id and replaces the data; associations stay."""
        record_id = await create(store, {"n": 1, "old": True}, ROOM, USER)
        assert await run(store, lambda _r, w: w.update(record_id, {"n": 2})) == record_id
        data, associations, _ = (await state(store))[record_id]
        assert (data, associations) == ({"n": 2}, frozenset({"room:r1", "user:u1"}))

    async def test_update_of_a_missing_id_without_upsert_raises_record_not_found(self, store: Store) -> None:
        """update(id) of an id that does not exist raises RecordNotFoundError suggesting upsert, and stores nothing."""
        session = Session(store)
        with pytest.raises(RecordNotFoundError, match="upsert=True"):
            await session.write.update("missing", {"n": 1})
        await session.commit()
        assert await state(store) == {}

    async def test_update_of_a_missing_id_with_upsert_creates_it_with_that_id(self, store: Store) -> None:
        """update(id, data, upsert=True) of a missing id creates a record with exactly that id."""
        assert await run(store, lambda _r, w: w.update("chosen-id", {"n": 1}, upsert=True)) == "chosen-id"
        assert await state(store) == {"chosen-id": ({"n": 1}, frozenset(), 1)}

    async def test_update_with_upsert_of_an_existing_id_updates_it(self, store: Store) -> None:
        """upsert=True on an existing id is a plain update: still one record."""
        record_id = await create(store, {"n": 1}, ROOM)
        await run(store, lambda _r, w: w.update(record_id, {"n": 2}, upsert=True))
        assert [(d, a) for d, a, _ in (await state(store)).values()] == [({"n": 2}, frozenset({"room:r1"}))]

    @pytest.mark.parametrize(
        ("call", "expected"),
        [
            (lambda w: w.update_by_association(ROOM, {"n": 0}), {"both": 0, "room": 0, "user": 1}),
            (lambda w: w.update_by_association(USER, {"n": 0}), {"both": 0, "room": 1, "user": 0}),
            (lambda w: w.update_by_associations([ROOM, USER], {"n": 0}), {"both": 0, "room": 1, "user": 1}),
            (lambda w: w.update_by_associations([ROOM, USER], {"n": 0}, upsert=True), {"both": 0, "room": 1, "user": 1}),
        ],
        ids=["room", "user", "room+user", "room+user-upsert"],
    )
    async def test_update_by_associations_updates_every_match(self, store: Store, call: Any, expected: dict[str, int]) -> None:
        """update_by_association(s) replaces the data of every record having all associations and returns their ids."""
        ids = {
            name: await create(store, {"n": 1}, *assocs)
            for name, assocs in {"both": (ROOM, USER), "room": (ROOM,), "user": (USER,)}.items()
        }
        updated = await run(store, lambda _r, w: call(w))
        after = await state(store)
        assert sorted(updated) == sorted(ids[name] for name, n in expected.items() if n == 0)
        assert {name: after[ids[name]][0]["n"] for name in ids} == expected
        assert len(after) == 3

    @pytest.mark.parametrize(
        ("call", "associations"),
        [
            (lambda w: w.update_by_association(TOTAL, {"count": 1}, upsert=True), {"misc:count"}),
            (lambda w: w.update_by_associations([TOTAL, ROOM], {"count": 1}, upsert=True), {"misc:count", "room:r1"}),
        ],
        ids=["update_by_association", "update_by_associations"],
    )
    async def test_update_by_associations_with_upsert_creates_one_record_when_none_match(
        self, store: Store, call: Any, associations: set[str]
    ) -> None:
        """With upsert and no match, exactly one record is created, having every association given."""
        await create(store, {"count": 5}, ROOM)  # has one of the associations only: not a match
        (new_id,) = await run(store, lambda _r, w: call(w))
        after = await state(store)
        assert len(after) == 2
        assert after[new_id][:2] == ({"count": 1}, frozenset(associations))

    @pytest.mark.parametrize(
        "call",
        [lambda w: w.update_by_association(NOBODY, {"n": 1}), lambda w: w.update_by_associations([ROOM, NOBODY], {"n": 1})],
        ids=["update_by_association", "update_by_associations"],
    )
    async def test_update_by_associations_without_upsert_and_no_match_raises(self, store: Store, call: Any) -> None:
        """No match without upsert raises RecordNotFoundError naming the association and the fix; nothing changes."""
        await create(store, {"n": 0}, ROOM)
        before = await state(store)
        session = Session(store)
        with pytest.raises(RecordNotFoundError, match=r"file:nobody-has-this.*upsert=True"):
            await call(session.write)
        await session.commit()
        assert await state(store) == before

    async def test_update_by_associations_with_a_single_association_is_refused(self, store: Store) -> None:
        """update_by_associations(ROOM, ...) (not a list) raises TypeError."""
        with pytest.raises(TypeError):
            await Session(store).write.update_by_associations(ROOM, {"n": 1})  # type: ignore[arg-type]


class TestRemove:
    async def test_remove_returns_the_removed_data(self, store: Store) -> None:
        """remove(id) returns [data] and the record is gone, associations included."""
        record_id = await create(store, {"n": 1}, ROOM)
        keep = await create(store, {"n": 2}, ROOM)
        assert await run(store, lambda _r, w: w.remove(record_id)) == [{"n": 1}]
        assert set(await state(store)) == {keep}
        assert await run(store, lambda r, _w: r.read_by_association(ROOM)) == [{"n": 2}]

    async def test_remove_of_a_missing_id_returns_nothing(self, store: Store) -> None:
        """remove(id) of an id nobody created returns [] and changes nothing."""
        await create(store, {"n": 1})
        before = await state(store)
        assert await run(store, lambda _r, w: w.remove("missing")) == []
        assert await state(store) == before

    @pytest.mark.parametrize(
        ("call", "removed"),
        [
            (lambda w: w.remove_by_association(ROOM), {"both", "room"}),
            (lambda w: w.remove_by_associations([ROOM, USER]), {"both"}),
            (lambda w: w.remove_by_association(NOBODY), set()),
        ],
        ids=["room", "room+user", "no-match"],
    )
    async def test_remove_by_associations_removes_every_match_and_returns_it(self, store: Store, call: Any, removed: set[str]) -> None:
        """remove_by_association(s) removes exactly the records having all associations, returning their data."""
        for name, assocs in {"both": (ROOM, USER), "room": (ROOM,), "user": (USER,)}.items():
            await create(store, {"name": name}, *assocs)
        returned = await run(store, lambda _r, w: call(w))
        assert sorted(d["name"] for d in returned) == sorted(removed)
        assert sorted(d["name"] for d in await datas(store)) == sorted({"both", "room", "user"} - removed)

    async def test_a_removed_id_can_be_created_again_with_upsert(self, store: Store) -> None:
        """After remove(id), update(id, upsert=True) creates a new record with that id and a higher version."""
        await run(store, lambda _r, w: w.update("k", {"n": 1}, upsert=True))
        first_version = (await state(store))["k"][2]
        await run(store, lambda _r, w: w.remove("k"))
        await run(store, lambda _r, w: w.update("k", {"n": 2}, upsert=True))
        data, _, version = (await state(store))["k"]
        assert data == {"n": 2}
        assert version > first_version


class TestInvalidData:
    BAD_DATA: tuple[Any, ...] = (
        [1, 2],
        "text",
        {"a", "b"},
        None,
        42,
        {"when": object()},
        {"tags": {"a"}},
        {1: "int key"},
        {"big": 2**70},
    )
    BAD_IDS = ("list", "str", "set", "none", "int", "object-value", "set-value", "int-key", "int-over-64-bits")

    WRITES: tuple[Callable[[PersistenceWriter, Any], Awaitable[Any]], ...] = (
        lambda w, d: w.create(d),
        lambda w, d: w.create_with_association(d, ROOM),
        lambda w, d: w.create_with_associations(d, [ROOM, USER]),
        lambda w, d: w.update("existing", d),
        lambda w, d: w.update("missing", d, upsert=True),
        lambda w, d: w.update_by_association(ROOM, d),
        lambda w, d: w.update_by_association(NOBODY, d, upsert=True),
        lambda w, d: w.update_by_associations([ROOM, USER], d),
    )
    WRITE_IDS = (
        "create",
        "create_with_association",
        "create_with_associations",
        "update",
        "update-upsert",
        "update_by_association",
        "update_by_association-upsert",
        "update_by_associations",
    )

    @pytest.mark.parametrize("write", WRITES, ids=WRITE_IDS)
    async def test_data_that_is_not_a_json_object_is_refused_at_the_call(self, store: Store, write: Any) -> None:
        """Every write refuses non-object or non-JSON data with InvalidDataError, and stages nothing."""
        await run(store, lambda _r, w: w.update("existing", {"n": 0}, upsert=True))
        await run(store, lambda _r, w: w.update_by_associations([ROOM, USER], {"n": 0}, upsert=True))
        before = await state(store)
        session = Session(store)
        for bad, name in zip(self.BAD_DATA, self.BAD_IDS, strict=True):
            with pytest.raises(InvalidDataError, match="JSON"):
                await write(session.write, bad)
            assert session.unit.is_empty, f"{name}: a refused write was staged"
        await session.commit()
        assert await state(store) == before

    async def test_a_mapping_that_is_not_a_dict_is_accepted(self, store: Store) -> None:
        """Data is typed as a Mapping: a read-only mapping of JSON values is stored like a dict."""
        from types import MappingProxyType

        record_id = await create(store, MappingProxyType({"n": 1}))  # type: ignore[arg-type]
        assert await run(store, lambda r, _w: r.read(record_id)) == {"n": 1}


class TestReadYourWrites:
    @pytest.mark.parametrize(
        ("write", "read", "expected"),
        [
            (lambda w, ids: w.create_with_association({"n": 9}, USER), lambda r, ids: r.read_by_association(USER), [{"n": 9}]),
            (lambda w, ids: w.create_with_association({"n": 9}, ROOM), lambda r, ids: r.read_by_association(ROOM), [{"n": 1}, {"n": 9}]),
            (lambda w, ids: w.update(ids["x"], {"n": 2}), lambda r, ids: r.read(ids["x"]), {"n": 2}),
            (lambda w, ids: w.update("new", {"n": 3}, upsert=True), lambda r, ids: r.read("new"), {"n": 3}),
            (lambda w, ids: w.update_by_association(ROOM, {"n": 4}), lambda r, ids: r.read_by_association(ROOM), [{"n": 4}]),
            (lambda w, ids: w.update_by_association(USER, {"n": 5}, upsert=True), lambda r, ids: r.read_by_association(USER), [{"n": 5}]),
            (lambda w, ids: w.remove(ids["x"]), lambda r, ids: r.read(ids["x"]), None),
            (lambda w, ids: w.remove(ids["x"]), lambda r, ids: r.read_by_association(ROOM), []),
            (lambda w, ids: w.remove_by_association(ROOM), lambda r, ids: r.read(ids["x"]), None),
        ],
        ids=[
            "create-then-read-new-association",
            "create-then-read-existing-association",
            "update-then-read",
            "upsert-then-read",
            "update_by_association-then-read",
            "upsert_by_association-then-read",
            "remove-then-read",
            "remove-then-read_by_association",
            "remove_by_association-then-read",
        ],
    )
    async def test_a_read_after_a_write_in_the_same_unit_sees_the_write(self, store: Store, write: Any, read: Any, expected: Any) -> None:
        """Inside one unit of work, reads return the unit's own staged writes, before commit."""
        ids = {"x": await create(store, {"n": 1}, ROOM)}
        session = Session(store)
        await write(session.write, ids)
        found = await read(session.read, ids)
        assert (sorted(found, key=repr) if isinstance(found, list) else found) == expected

    async def test_a_read_before_a_write_in_the_same_unit_is_updated_by_it(self, store: Store) -> None:
        """Reading first (caching the result), then writing, then reading again returns the write."""
        record_id = await create(store, {"n": 1}, ROOM)
        session = Session(store)
        assert await session.read.read_by_association(ROOM) == [{"n": 1}]
        await session.write.update(record_id, {"n": 2})
        new_id = await session.write.create_with_association({"n": 3}, ROOM)
        assert sorted(d["n"] for d in await session.read.read_by_association(ROOM)) == [2, 3]
        await session.write.remove(record_id)
        assert await session.read.read_by_association(ROOM) == [{"n": 3}]
        (record,) = await session.read.read_records_by_association(ROOM)
        assert (record.id, record.version) == (new_id, 0)

    async def test_a_record_recreated_without_its_association_is_not_read_by_it(self, store: Store) -> None:
        """remove(id) then update(id, upsert=True) makes a record without associations: association reads no longer return it."""
        record_id = await create(store, {"n": 1}, ROOM)
        session = Session(store)
        assert await session.read.read_by_association(ROOM) == [{"n": 1}]
        await session.write.remove(record_id)
        await session.write.update(record_id, {"n": 2}, upsert=True)
        assert await session.read.read_by_association(ROOM) == []
        assert await session.read.read(record_id) == {"n": 2}
        await session.commit()
        assert await run(store, lambda r, _w: r.read_by_association(ROOM)) == []
        assert (await state(store))[record_id][:2] == ({"n": 2}, frozenset())

    async def test_staged_writes_are_invisible_to_other_units_until_commit(self, store: Store) -> None:
        """Another unit does not see a unit's writes before it commits, and does after."""
        writer = Session(store)
        await writer.write.create_with_association({"n": 1}, ROOM)
        assert await run(store, lambda r, _w: r.read_by_association(ROOM)) == []
        await writer.commit()
        assert await run(store, lambda r, _w: r.read_by_association(ROOM)) == [{"n": 1}]


class TestRollbackTo:
    async def test_rollback_undoes_every_write_staged_since_the_checkpoint(self, store: Store) -> None:
        """Writes before the checkpoint commit; creates, updates and removes after it are undone."""
        kept = await create(store, {"n": 1}, ROOM)
        gone = await create(store, {"n": 2}, USER)
        session = Session(store)
        early = await session.write.create_with_association({"early": True}, TOTAL)
        checkpoint = session.unit.checkpoint()
        late = await session.write.create_with_association({"late": True}, TOTAL)
        await session.write.update(kept, {"n": 100})
        await session.write.remove(gone)
        await session.write.update_by_association(TOTAL, {"both": True})
        session.unit.rollback_to(checkpoint)
        assert await session.read.read(late) is None
        assert await session.read.read(kept) == {"n": 1}
        assert await session.read.read(gone) == {"n": 2}
        assert await session.read.read_by_association(TOTAL) == [{"early": True}]
        await session.commit()
        after = await state(store)
        assert {k: v[0] for k, v in after.items()} == {kept: {"n": 1}, gone: {"n": 2}, early: {"early": True}}

    async def test_rollback_to_an_empty_checkpoint_leaves_nothing_to_commit(self, store: Store) -> None:
        """Rolling back every write leaves the unit empty; committing it changes no record."""
        record_id = await create(store, {"n": 1}, ROOM)
        before = await state(store)
        session = Session(store)
        checkpoint = session.unit.checkpoint()
        await session.write.update(record_id, {"n": 2})
        await session.write.create({"n": 3})
        session.unit.mark_processed((APP, "src", "e1"))
        session.unit.rollback_to(checkpoint)
        assert session.unit.is_empty
        await session.commit()
        assert await state(store) == before
        assert await store.processed_count(APP) == 0


class TestVersions:
    async def test_every_committed_write_increases_the_version(self, store: Store) -> None:
        """create, update, update_by_association and upsert each leave a higher version than before."""
        record_id = await create(store, {"n": 0}, ROOM)
        versions = [(await state(store))[record_id][2]]
        writes: list[Call] = [
            lambda _r, w: w.update(record_id, {"n": 1}),
            lambda _r, w: w.update_by_association(ROOM, {"n": 2}),
            lambda _r, w: w.update(record_id, {"n": 3}, upsert=True),
            lambda _r, w: w.update_by_associations([ROOM], {"n": 4}, upsert=True),
        ]
        for write in writes:
            await run(store, write)
            versions.append((await state(store))[record_id][2])
        assert versions == sorted(set(versions))
        assert len(versions) == 5

    async def test_a_unit_that_only_reads_changes_no_version(self, store: Store) -> None:
        """Committing reads alone leaves every version as it was."""
        record_id = await create(store, {"n": 0}, ROOM)
        before = await state(store)
        await run(store, lambda r, _w: r.read(record_id))
        await run(store, lambda r, _w: r.read_by_association(ROOM))
        assert await state(store) == before

    async def test_the_versioned_read_shows_the_committed_version(self, store: Store) -> None:
        """read_record's version is the version the store holds, and grows with each update."""
        record_id = await create(store, {"n": 0}, ROOM)
        first = await run(store, lambda r, _w: r.read_record(record_id))
        await run(store, lambda _r, w: w.update(record_id, {"n": 1}))
        second = await run(store, lambda r, _w: r.read_record(record_id))
        assert first.version == 1
        assert second.version > first.version
        assert second.version == (await state(store))[record_id][2]


class TestAppIsolation:
    ISOLATED: tuple[tuple[Call, Any], ...] = (
        (lambda r, _w: r.read("b-record"), None),
        (lambda r, _w: r.read_record("b-record"), None),
        (lambda r, _w: r.read_by_association(ROOM), []),
        (lambda r, _w: r.read_by_associations([ROOM, USER]), []),
        (lambda r, _w: r.read_records_by_association(ROOM), []),
        (lambda _r, w: w.remove("b-record"), []),
        (lambda _r, w: w.remove_by_association(ROOM), []),
        (lambda _r, w: w.remove_by_associations([ROOM, USER]), []),
    )
    ISOLATED_IDS = (
        "read",
        "read_record",
        "read_by_association",
        "read_by_associations",
        "read_records_by_association",
        "remove",
        "remove_by_association",
        "remove_by_associations",
    )

    async def _other_apps_record(self, store: Store) -> dict[str, Any]:
        await run(store, lambda _r, w: w.update("b-record", {"owner": "b"}, upsert=True), app=OTHER_APP)
        await run(store, lambda _r, w: w.update_by_associations([ROOM, USER], {"owner": "b", "linked": True}, upsert=True), app=OTHER_APP)
        return await state(store, OTHER_APP)

    @pytest.mark.parametrize(("call", "expected"), ISOLATED, ids=ISOLATED_IDS)
    async def test_an_app_cannot_read_or_remove_another_apps_records(self, store: Store, call: Call, expected: Any) -> None:
        """Reads and removes by id or by association see nothing of another app; its records stay unchanged."""
        before = await self._other_apps_record(store)
        assert await run(store, call, app=APP) == expected
        assert await state(store, OTHER_APP) == before

    @pytest.mark.parametrize(
        "call",
        [
            lambda w: w.update("b-record", {"owner": "a"}),
            lambda w: w.update_by_association(ROOM, {"owner": "a"}),
            lambda w: w.update_by_associations([ROOM, USER], {"owner": "a"}),
        ],
        ids=["update", "update_by_association", "update_by_associations"],
    )
    async def test_an_app_cannot_update_another_apps_records(self, store: Store, call: Any) -> None:
        """Updates without upsert find no record of another app: RecordNotFoundError, and its records stay unchanged."""
        before = await self._other_apps_record(store)
        with pytest.raises(RecordNotFoundError):
            await run(store, lambda _r, w: call(w), app=APP)
        assert await state(store, OTHER_APP) == before

    @pytest.mark.parametrize(
        "call",
        [
            lambda w: w.update("b-record", {"owner": "a"}, upsert=True),
            lambda w: w.update_by_association(ROOM, {"owner": "a"}, upsert=True),
            lambda w: w.update_by_associations([ROOM, USER], {"owner": "a"}, upsert=True),
        ],
        ids=["update", "update_by_association", "update_by_associations"],
    )
    async def test_an_upsert_creates_the_apps_own_record_beside_another_apps(self, store: Store, call: Any) -> None:
        """With upsert, an app gets a record of its own, even with the same id; the other app's record stays unchanged."""
        before = await self._other_apps_record(store)
        await run(store, lambda _r, w: call(w), app=APP)
        assert await datas(store, APP) == [{"owner": "a"}]
        assert await state(store, OTHER_APP) == before


class TestVersionChecks:
    async def test_a_unit_whose_read_record_changed_conflicts_and_applies_nothing(self, store: Store) -> None:
        """Read by id, another unit updates it and commits: commit raises VersionConflict, no write of the unit is applied."""
        record_id = await create(store, {"n": 0}, ROOM)
        other = await create(store, {"n": 0}, USER)
        first = Session(store)
        value = await first.read.read(record_id)
        assert value is not None
        await run(store, lambda _r, w: w.update(record_id, {"n": 10}))
        await first.write.update(record_id, {"n": value["n"] + 1})
        await first.write.update(other, {"n": 1})
        await first.write.create_with_association({"new": True}, TOTAL)
        with pytest.raises(VersionConflict):
            await first.commit()
        after = await state(store)
        assert {k: v[0] for k, v in after.items()} == {record_id: {"n": 10}, other: {"n": 0}}

    async def test_a_unit_that_only_read_a_changed_record_conflicts(self, store: Store) -> None:
        """A read is checked even when the unit writes something else: the write is not applied."""
        record_id = await create(store, {"n": 0}, ROOM)
        first = Session(store)
        await first.read.read_record(record_id)
        await first.write.create({"derived": True})
        await run(store, lambda _r, w: w.update(record_id, {"n": 1}))
        with pytest.raises(VersionConflict):
            await first.commit()
        assert await datas(store) == [{"n": 1}]

    @pytest.mark.parametrize(
        "change",
        [
            lambda w, rid: w.update(rid, {"n": 1}),
            lambda w, rid: w.update_by_association(USER, {"n": 1}),
            lambda w, rid: w.remove(rid),
            lambda w, rid: w.remove_by_association(USER),
            lambda w, rid: w.create_with_association({"n": 1}, ROOM),
        ],
        ids=["update-by-id", "update-through-other-association", "remove-by-id", "remove-through-other-association", "blind-create"],
    )
    async def test_a_change_to_what_an_association_read_returned_conflicts(self, store: Store, change: Any) -> None:
        """Any committed change to the records having an association (however made) conflicts a unit that read it."""
        record_id = await create(store, {"n": 0}, ROOM, USER)
        first = Session(store)
        assert len(await first.read.read_by_association(ROOM)) == 1
        await first.write.update_by_association(ROOM, {"n": 100})
        await run(store, lambda _r, w: change(w, record_id))
        before = await state(store)
        with pytest.raises(VersionConflict):
            await first.commit()
        assert await state(store) == before

    async def test_two_upserts_of_a_missing_association_end_with_one_record(self, store: Store) -> None:
        """Both units see no record and upsert: the second conflicts; its retry updates the one record."""
        units = [Session(store), Session(store)]
        for session in units:
            assert await session.read.read_by_association(TOTAL) == []
            await session.write.update_by_association(TOTAL, {"count": 1}, upsert=True)
        await units[0].commit()
        with pytest.raises(VersionConflict):
            await units[1].commit()
        assert await datas(store) == [{"count": 1}]

        async def increment(r: PersistenceReader, w: PersistenceWriter) -> None:
            found = await r.read_by_association(TOTAL)
            await w.update_by_association(TOTAL, {"count": (found[0]["count"] if found else 0) + 1}, upsert=True)

        await run(store, increment)
        assert await datas(store) == [{"count": 2}]

    async def test_two_upserts_of_a_missing_id_end_with_one_record(self, store: Store) -> None:
        """Both units see no record with an id and upsert it: the second conflicts."""
        units = [Session(store), Session(store)]
        for n, session in enumerate(units):
            await session.write.update("k", {"by": n}, upsert=True)
        await units[1].commit()
        with pytest.raises(VersionConflict):
            await units[0].commit()
        assert await state(store) == {"k": ({"by": 1}, frozenset(), 1)}

    async def test_a_blind_create_conflicts_a_unit_that_saw_nothing(self, store: Store) -> None:
        """A unit that read "no record has ROOM" conflicts once another unit creates one with ROOM, unread."""
        first = Session(store)
        assert await first.read.read_by_association(ROOM) == []
        await first.write.create({"saw": "nothing"})
        await run(store, lambda _r, w: w.create_with_associations({"blind": True}, [USER, ROOM]))
        with pytest.raises(VersionConflict):
            await first.commit()
        assert await datas(store) == [{"blind": True}]

    async def test_units_with_disjoint_reads_and_writes_both_commit(self, store: Store) -> None:
        """The check is per key: units touching different records and associations do not conflict."""
        room_1 = Association(AssociationModel.ROOM, "r1")
        room_2 = Association(AssociationModel.ROOM, "r2")
        units = [Session(store), Session(store)]
        for session, room in zip(units, (room_1, room_2), strict=True):
            assert await session.read.read_by_association(room) == []
            await session.write.update_by_association(room, {"room": room.id}, upsert=True)
        for session in units:
            await session.commit()
        assert await datas(store) == [{"room": "r1"}, {"room": "r2"}]

    async def test_another_apps_change_does_not_conflict(self, store: Store) -> None:
        """Versions are per app: app B upserting the same association does not conflict app A."""
        first = Session(store, APP)
        assert await first.read.read_by_association(TOTAL) == []
        await first.write.update_by_association(TOTAL, {"app": "a"}, upsert=True)
        await run(store, lambda _r, w: w.update_by_association(TOTAL, {"app": "b"}, upsert=True), app=OTHER_APP)
        await first.commit()
        assert await datas(store, APP) == [{"app": "a"}]
        assert await datas(store, OTHER_APP) == [{"app": "b"}]

    async def test_the_first_version_read_is_the_one_checked(self, store: Store) -> None:
        """Reading a key again after it changed does not hide the change: the unit still conflicts."""
        record_id = await create(store, {"n": 0}, ROOM)
        first = Session(store)
        await first.read.read_by_association(ROOM)
        await run(store, lambda _r, w: w.update(record_id, {"n": 1}))
        await first.read.read(record_id)  # a new key, loaded after the change
        await first.write.update(record_id, {"n": 2})
        with pytest.raises(VersionConflict):
            await first.commit()
        assert await datas(store) == [{"n": 1}]


class TestProcessedMarkers:
    MARKER = (APP, "//chat.example.com", "evt-1")

    async def test_committing_the_same_marker_twice_conflicts_and_applies_nothing(self, store: Store) -> None:
        """A second unit recording an already processed event conflicts; its writes are not applied."""
        for n in range(2):
            session = Session(store)
            await session.write.update_by_association(TOTAL, {"count": n + 1}, upsert=True)
            session.unit.mark_processed(self.MARKER)
            if n == 0:
                await session.commit()
            else:
                with pytest.raises(VersionConflict, match="processed"):
                    await session.commit()
        assert await datas(store) == [{"count": 1}]
        assert await store.processed_count(APP) == 1

    async def test_two_concurrent_units_processing_one_event_commit_once(self, store: Store) -> None:
        """Both see the event unprocessed; the second to commit conflicts."""
        units = [Session(store), Session(store)]
        for session in units:
            assert await session.unit.already_processed([self.MARKER]) == set()
            await session.write.create({"processed": True})
            session.unit.mark_processed(self.MARKER)
        await units[0].commit()
        with pytest.raises(VersionConflict):
            await units[1].commit()
        assert await datas(store) == [{"processed": True}]

    async def test_already_processed_sees_committed_and_staged_markers_only(self, store: Store) -> None:
        """already_processed returns markers committed earlier or staged in this unit, not those of uncommitted units."""
        committed, staged, pending = (APP, "s", "committed"), (APP, "s", "staged"), (APP, "s", "pending")
        await commit_marker(store, committed)
        uncommitted = Session(store)
        uncommitted.unit.mark_processed(pending)
        session = Session(store)
        session.unit.mark_processed(staged)
        assert await session.unit.already_processed([committed, staged, pending]) == {committed, staged}
        assert await Session(store).unit.already_processed([committed, staged, pending]) == {committed}

    async def test_markers_are_per_app(self, store: Store) -> None:
        """One app's marker for an event does not mark it processed for another app."""
        await commit_marker(store, self.MARKER)
        other = (OTHER_APP, *self.MARKER[1:])
        assert await Session(store).unit.already_processed([self.MARKER, other]) == {self.MARKER}
        await commit_marker(store, other)
        assert await store.processed_count(OTHER_APP) == 1


class TestFencing:
    async def test_claim_bumps_the_generation_each_time(self, store: Store) -> None:
        """Each claim of a partition returns a higher generation than the one before."""
        first = await store.claim("g", "t", [0, 1], "w1")
        second = await store.claim("g", "t", [1], "w2")
        assert sorted(first) == [0, 1]
        assert second[1].fence.generation == first[1].fence.generation + 1
        assert first[0].next_offset is None

    async def test_a_commit_with_a_stale_fence_is_refused_and_applies_nothing(self, store: Store) -> None:
        """After another worker claims the partition, a commit with the old fence raises FencedError and changes nothing."""
        old = (await store.claim("g", "t", [3], "w1"))[3].fence
        await store.claim("g", "t", [3], "w2")
        session = Session(store)
        await session.write.update_by_association(TOTAL, {"count": 1}, upsert=True)
        session.unit.mark_processed((APP, "s", "e1"))
        with pytest.raises(FencedError, match=r"t\[3\]"):
            await session.commit(old, next_offset=10)
        assert await state(store) == {}
        assert await store.processed_count(APP) == 0
        assert await store.stored_offsets("g", "t") == {}

    async def test_the_offset_committed_with_the_state_is_returned_by_the_next_claim(self, store: Store) -> None:
        """next_offset is stored with the unit and handed to the partition's next owner."""
        fence = (await store.claim("g", "t", [2], "w1"))[2].fence
        session = Session(store)
        await session.write.create({"n": 1})
        await session.commit(fence, next_offset=42)
        assert await store.stored_offsets("g", "t") == {2: 42}
        claim = (await store.claim("g", "t", [2], "w2"))[2]
        assert claim.next_offset == 42
        await Session(store).commit(claim.fence, next_offset=50)
        assert await store.stored_offsets("g", "t") == {2: 50}

    async def test_a_commit_without_an_offset_keeps_the_stored_one(self, store: Store) -> None:
        """Committing with the current fence but no next_offset leaves the stored offset as it was."""
        fence = (await store.claim("g", "t", [0], "w1"))[0].fence
        await Session(store).commit(fence, next_offset=7)
        await Session(store).commit(fence)
        assert await store.stored_offsets("g", "t") == {0: 7}

    async def test_fences_are_per_group_and_topic(self, store: Store) -> None:
        """Claiming a partition of another group or topic does not fence this one."""
        fence = (await store.claim("g", "t", [0], "w1"))[0].fence
        await store.claim("other-group", "t", [0], "w2")
        await store.claim("g", "other-topic", [0], "w2")
        await Session(store).commit(fence, next_offset=1)
        assert await store.stored_offsets("g", "t") == {0: 1}


class TestLaneSnapshots:
    """A dispatcher lane carries a Snapshot from unit to unit: a stale entry may cost a conflict, never a wrong read."""

    @staticmethod
    async def _lane_commit(store: Store, snapshot: Snapshot, unit: UnitOfWork) -> None:
        snapshot.absorb(unit, await store.commit(unit))

    async def test_a_stale_snapshot_read_conflicts_at_commit(self, store: Store) -> None:
        """The lane's cached result for an association another unit has changed since makes the commit conflict."""
        snapshot = Snapshot()
        unit = UnitOfWork(store, snapshot)
        assert await unit.read_by_associations(APP, [ROOM]) == []
        await self._lane_commit(store, snapshot, unit)
        await create(store, {"n": 1}, ROOM)
        unit = UnitOfWork(store, snapshot)
        assert await unit.read_by_associations(APP, [ROOM]) == []  # served from the snapshot, stale
        unit.create(APP, {"saw": "nothing"}, [])
        with pytest.raises(VersionConflict):
            await store.commit(unit)
        assert await datas(store) == [{"n": 1}]

    async def test_a_snapshot_result_older_than_a_version_the_unit_read_is_not_used(self, store: Store) -> None:
        """After the unit reads a newer version of an association, the lane's older result for it is not served."""
        # App-global associations: a query for two of them is read from the database, not
        # derived from the lane's records of its guard (as a room's would be).
        other = Association(AssociationModel.MISC, "other")
        snapshot = Snapshot()
        unit = UnitOfWork(store, snapshot)
        unit.create(APP, {"n": 1}, [TOTAL, other])
        await self._lane_commit(store, snapshot, unit)
        unit = UnitOfWork(store, snapshot)
        assert len(await unit.read_by_associations(APP, [TOTAL])) == 1
        await self._lane_commit(store, snapshot, unit)
        await create(store, {"n": 2}, TOTAL, other)  # another lane
        unit = UnitOfWork(store, snapshot)
        # From the database, guarded by misc:count: a newer version of it than the lane's.
        assert len(await unit.read_by_associations(APP, [TOTAL, other])) == 2
        assert sorted(s.data for s in await unit.read_by_associations(APP, [TOTAL])) == [b'{"n":1}', b'{"n":2}']

    async def test_a_room_query_for_several_associations_is_answered_from_the_rooms_records(self, store: Store) -> None:
        """Once a lane has read a room's records, "this user's in this room" costs no round trip, and stays checked."""
        snapshot = Snapshot()
        unit = UnitOfWork(store, snapshot)
        unit.create(APP, {"n": 1}, [ROOM, USER])
        unit.create(APP, {"n": 2}, [ROOM, Association(AssociationModel.USER, "u2")])
        await self._lane_commit(store, snapshot, unit)
        unit = UnitOfWork(store, snapshot)
        assert len(await unit.read_by_associations(APP, [ROOM])) == 2
        await self._lane_commit(store, snapshot, unit)
        unit = UnitOfWork(NoLoader(), snapshot)  # any round trip fails the test
        assert [s.data for s in await unit.read_by_associations(APP, [USER, ROOM])] == [b'{"n":1}']
        assert await unit.read_by_associations(APP, [ROOM, Association(AssociationModel.USER, "u3")]) == []
        await create(store, {"n": 3}, ROOM, Association(AssociationModel.USER, "u3"))  # another lane
        unit.create(APP, {"saw": "no u3"}, [TOTAL])
        with pytest.raises(VersionConflict):
            await store.commit(unit)

    async def test_a_stale_result_for_an_association_the_unit_did_not_check_never_commits(self, store: Store) -> None:
        """A lane result for the user's association, older than what the unit read through the room's, makes the commit conflict."""
        snapshot = Snapshot()
        unit = UnitOfWork(store, snapshot)
        unit.create(APP, {"n": 1}, [ROOM, USER])
        await self._lane_commit(store, snapshot, unit)
        unit = UnitOfWork(store, snapshot)
        assert len(await unit.read_by_associations(APP, [USER])) == 1
        await self._lane_commit(store, snapshot, unit)
        await create(store, {"n": 2}, ROOM, USER)  # another lane
        unit = UnitOfWork(store, snapshot)
        assert len(await unit.read_by_associations(APP, [ROOM, USER])) == 2
        assert len(await unit.read_by_associations(APP, [USER])) == 1  # the lane's older result
        unit.create(APP, {"saw": 1}, [TOTAL])
        with pytest.raises(VersionConflict):
            await store.commit(unit)
        assert sorted(d.get("n", 0) for d in await datas(store)) == [1, 2]

    async def test_a_query_is_not_conflicted_by_writes_to_its_global_association_elsewhere(self, store: Store) -> None:
        """A query for room and misc associations is checked by the room's key: another room's write to the misc one does not conflict it."""
        unit = UnitOfWork(store)
        assert await unit.read_by_associations(APP, [TOTAL, ROOM]) == []
        await create(store, {"n": 1}, TOTAL, Association(AssociationModel.ROOM, "elsewhere"))  # another lane
        unit.create(APP, {"n": 2}, [TOTAL, ROOM])
        await store.commit(unit)
        assert sorted(d["n"] for d in await datas(store)) == [1, 2]

    async def test_a_snapshot_forgets_results_made_stale_by_a_newer_read(self, store: Store) -> None:
        """A unit that read a newer version of an association makes the lane drop its older result for it."""
        other = Association(AssociationModel.MISC, "other")  # app-global: not derived from the lane's records
        snapshot = Snapshot()
        unit = UnitOfWork(store, snapshot)
        unit.create(APP, {"n": 1}, [TOTAL, other])
        await self._lane_commit(store, snapshot, unit)
        unit = UnitOfWork(store, snapshot)
        assert len(await unit.read_by_associations(APP, [TOTAL])) == 1
        await self._lane_commit(store, snapshot, unit)
        await run(store, lambda _r, w: w.remove_by_association(TOTAL))  # another lane
        unit = UnitOfWork(store, snapshot)
        assert await unit.read_by_associations(APP, [TOTAL, other]) == []  # from the database: newer versions
        await self._lane_commit(store, snapshot, unit)
        unit = UnitOfWork(store, snapshot)
        assert await unit.read_by_associations(APP, [TOTAL]) == []
        await store.commit(unit)


class TestQueryGuards:
    """Which association's version checks a query: the one whose records have the fewest writers."""

    @pytest.mark.parametrize(
        ("associations", "guard"),
        [
            (["misc:unread", "room:r1", "user:u1"], "room:r1"),
            (["misc:unread", "user:u1"], "user:u1"),
            (["message:m1", "user:u1"], "message:m1"),
            (["misc:b", "misc:a"], "misc:a"),
            (["misc:count"], "misc:count"),
        ],
    )
    def test_the_guard_prefers_room_then_message_then_user_over_misc(self, associations: list[str], guard: str) -> None:
        """Rooms own their partition's records; misc associations are often global."""
        assert guard_key(APP, associations) == (APP, f"as:{guard}")


class TestRoundTrips:
    async def test_a_commit_costs_as_many_round_trips_for_fifty_keys_as_for_one(self, store: Store) -> None:
        """Versions, records, links, markers and outbox rows go in a few multi-row statements, whatever their number."""
        counted: list[int] = []
        store.count_round_trips(counted.append)

        async def commit_creating(count: int, room: str) -> int:
            unit = UnitOfWork(store)
            for n in range(count):
                unit.create(APP, {"n": n}, [Association(AssociationModel.ROOM, f"{room}-{n}"), USER])
                unit.mark_processed((APP, "//t", f"{room}-{n}"))
            counted.clear()
            await store.commit(unit)
            return sum(counted)

        one = await commit_creating(1, "a")
        assert one > 0
        assert await commit_creating(50, "b") == one

    async def test_a_commit_checks_and_bumps_every_key_in_one_version_statement(self, store: Store) -> None:
        """Keys read and keys written are locked, checked and bumped together: one statement, not one to lock and one to bump."""
        read_only = await create(store, {"n": 1}, ROOM)
        written = await create(store, {"n": 2}, TOTAL)
        before = await key_versions_of(store)
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
            statements.append(statement)

        unit = UnitOfWork(store)
        assert await unit.read_by_associations(APP, [ROOM])
        await unit.update_by_associations(APP, [TOTAL], {"n": 3}, upsert=False)
        event.listen(store.engine.sync_engine, "before_cursor_execute", seen)
        try:
            await store.commit(unit)
        finally:
            event.remove(store.engine.sync_engine, "before_cursor_execute", seen)
        assert len([s for s in statements if "key_versions" in s]) == 1
        after = await key_versions_of(store)
        assert after[f"id:{read_only}"] == before[f"id:{read_only}"]
        assert after[f"id:{written}"] == before[f"id:{written}"] + 1

    async def test_a_prefetch_reads_many_rooms_in_one_round_trip_and_answers_their_queries(self, store: Store) -> None:
        """After one read of fifty rooms, what a handler asks of each room (alone, or with a user) costs nothing more."""
        rooms = [Association(AssociationModel.ROOM, f"p{n}") for n in range(50)]
        for n, room in enumerate(rooms[:10]):
            await create(store, {"n": n}, room, USER)
        await create(store, {"n": "other user"}, rooms[0], Association(AssociationModel.USER, "u2"))
        counted: list[int] = []
        store.count_round_trips(counted.append)
        unit = UnitOfWork(store)
        await unit.prefetch(APP, [str(room) for room in rooms])
        assert sum(counted) > 0
        counted.clear()
        queries = [[rooms[0]], [rooms[3], USER], [rooms[40]]]
        answers = [await unit.read_by_associations(APP, query) for query in queries]
        assert counted == []
        # The same records, in the same order (by id), as the database answers each query.
        plain = UnitOfWork(store)
        assert answers == [await plain.read_by_associations(APP, query) for query in queries]
        assert [{orjson.loads(r.data)["n"] for r in answer} for answer in answers] == [{0, "other user"}, {3}, set()]
        assert unit.room_readers == set()  # learned from a handler's own read only, not from a prefetch

    async def test_a_room_changed_after_its_prefetch_conflicts_at_commit(self, store: Store) -> None:
        """A prefetched room is a read like any other: checked at commit."""
        room = Association(AssociationModel.ROOM, "changing")
        unit = UnitOfWork(store)
        await unit.prefetch(APP, [str(room)])
        assert await unit.read_by_associations(APP, [room]) == []
        unit.create(APP, {"saw": "nothing"}, [room])
        await create(store, {"n": 1}, room)
        with pytest.raises(VersionConflict):
            await store.commit(unit)

    async def test_a_unit_that_reads_a_whole_room_names_its_app_a_room_reader(self, store: Store) -> None:
        """What the dispatcher learns which apps to prefetch for from."""
        unit = UnitOfWork(store)
        await unit.read_by_associations(APP, [USER])
        assert unit.room_readers == set()
        await unit.read_by_associations(OTHER_APP, [ROOM, USER])  # answered from all of the room's records
        assert unit.room_readers == {OTHER_APP}
