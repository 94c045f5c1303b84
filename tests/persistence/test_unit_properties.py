"""Concurrent units of work are serialisable: a hypothesis state machine against a model of serial execution.

Several units of work are open at once; each runs random persistence calls of two apps
(creates with associations from a small pool, updates and removes by id and by association,
with and without upsert, and reads), interleaved with the others', and they commit in random
order. A unit that conflicts is run again on a fresh unit and committed. Every committed unit
is then applied, in commit order, to an in-memory model of serial execution: each of its
calls must have returned what it returns in the model, and the store must hold exactly the
model's records after every step. This runs twice: with every unit starting from nothing,
and as the dispatcher runs partitions (a snapshot per lane carried from unit to unit, and
retries on the locked path).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from worker.apps.persistence import PersistenceReader, PersistenceWriter
from worker.config import PersistenceSettings
from worker.errors import RecordNotFoundError, VersionConflict
from worker.persistence.associations import Association
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Store
from worker.persistence.unit import Loader, UnitOfWork

_T = TypeVar("_T")

APPS = (0, 1)  # two apps per example: their records must never mix
POOL = ("room:r1", "user:u1")  # few associations, so units collide often
FIXED_IDS = ("k0", "k1")  # ids that update(upsert=True) may create before anyone reads them
SLOTS = 2  # units of work open at the same time (the lanes, with lanes); two meet more often than three
NOT_FOUND = "RecordNotFoundError"

Model = dict[tuple[int, str], tuple[dict[str, Any], frozenset[str]]]


# -- the calls ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    app: int
    associations: tuple[str, ...]
    value: int


@dataclass(frozen=True)
class Update:
    app: int
    record_id: str
    value: int
    upsert: bool


@dataclass(frozen=True)
class UpdateBy:
    app: int
    associations: tuple[str, ...]
    value: int
    upsert: bool


@dataclass(frozen=True)
class Remove:
    app: int
    record_id: str


@dataclass(frozen=True)
class RemoveBy:
    app: int
    associations: tuple[str, ...]


@dataclass(frozen=True)
class Read:
    app: int
    record_id: str


@dataclass(frozen=True)
class ReadBy:
    app: int
    associations: tuple[str, ...]


Op = Create | Update | UpdateBy | Remove | RemoveBy | Read | ReadBy


def calls(record_ids: list[str]) -> st.SearchStrategy[Op]:
    """Any one call; ids are those of known records and a few fixed ones."""
    app = st.sampled_from((*APPS, 0, 0))  # mostly the first app: more collisions between units
    some = st.lists(st.sampled_from(POOL), min_size=1, max_size=2, unique=True).map(tuple)
    value = st.integers(0, 9)
    # By position, in a deterministic order (the ids themselves are random uuids); only the
    # newest few, so that calls in one unit often meet the same record.
    ident = st.sampled_from(list(dict.fromkeys([*FIXED_IDS, *record_ids[-3:]])))
    return st.one_of(
        st.builds(Create, app, st.lists(st.sampled_from(POOL), max_size=2, unique=True).map(tuple), value),
        st.builds(Update, app, ident, value, st.booleans()),
        st.builds(UpdateBy, app, some, value, st.booleans()),
        st.builds(Remove, app, ident),
        st.builds(RemoveBy, app, some),
        st.builds(Read, app, ident),
        st.builds(ReadBy, app, some),
    )


# -- running a call on a unit of work, and on the model ----------------------------------


class Session:
    """One unit of work and the accessors of both apps over it (the dispatcher runs every app in one unit)."""

    def __init__(self, loader: Loader, app_ids: tuple[str, str], snapshot: Snapshot | None = None) -> None:
        self.unit = UnitOfWork(loader, snapshot)
        self.readers = [PersistenceReader(self.unit, a) for a in app_ids]
        self.writers = [PersistenceWriter(self.unit, a) for a in app_ids]


def _associations(names: tuple[str, ...]) -> list[Association]:
    return [Association.parse(name) for name in names]


async def perform(op: Op, session: Session) -> Any:
    """Run ``op`` through the accessors; the result in a comparable form."""
    reader, writer = session.readers[op.app], session.writers[op.app]
    match op:
        case Create():
            return await writer.create_with_associations({"v": op.value}, _associations(op.associations))
        case Update():
            try:
                return await writer.update(op.record_id, {"v": op.value}, upsert=op.upsert)
            except RecordNotFoundError:
                return NOT_FOUND
        case UpdateBy():
            try:
                return sorted(await writer.update_by_associations(_associations(op.associations), {"v": op.value}, upsert=op.upsert))
            except RecordNotFoundError:
                return NOT_FOUND
        case Remove():
            return sorted(await writer.remove(op.record_id), key=repr)
        case RemoveBy():
            return sorted(await writer.remove_by_associations(_associations(op.associations)), key=repr)
        case Read():
            return await reader.read(op.record_id)
        case ReadBy():
            found = await reader.read_records_by_associations(_associations(op.associations))
            return sorted((r.id, r.data, tuple(sorted(str(a) for a in r.associations))) for r in found)


def _matches(model: Model, app: int, associations: tuple[str, ...]) -> list[str]:
    return sorted(rid for (a, rid), (_, assocs) in model.items() if a == app and set(associations) <= assocs)


def expected(op: Op, model: Model, actual: Any) -> Any:  # noqa: C901 - one branch per call
    """Apply ``op`` to ``model`` (serial execution); returns what the call must have returned.

    ``actual`` is used only for the ids the store chose for records it created.
    """
    match op:
        case Create():
            model[(op.app, actual)] = ({"v": op.value}, frozenset(op.associations))
            return actual
        case Update():
            key = (op.app, op.record_id)
            if key in model:
                model[key] = ({"v": op.value}, model[key][1])
            elif op.upsert:
                model[key] = ({"v": op.value}, frozenset())
            else:
                return NOT_FOUND
            return op.record_id
        case UpdateBy():
            matches = _matches(model, op.app, op.associations)
            for rid in matches:
                model[(op.app, rid)] = ({"v": op.value}, model[(op.app, rid)][1])
            if matches:
                return matches
            if not op.upsert:
                return NOT_FOUND
            if not (isinstance(actual, list) and len(actual) == 1 and (op.app, actual[0]) not in model):
                return ["<one new record>"]
            model[(op.app, actual[0])] = ({"v": op.value}, frozenset(op.associations))
            return actual
        case Remove():
            removed = model.pop((op.app, op.record_id), None)
            return [removed[0]] if removed else []
        case RemoveBy():
            return sorted((model.pop((op.app, rid))[0] for rid in _matches(model, op.app, op.associations)), key=repr)
        case Read():
            found = model.get((op.app, op.record_id))
            return found[0] if found else None
        case ReadBy():
            return sorted(
                (rid, model[(op.app, rid)][0], tuple(sorted(model[(op.app, rid)][1]))) for rid in _matches(model, op.app, op.associations)
            )


# -- the state machine -------------------------------------------------------------------


@dataclass
class Stats:
    """Shared by every example of one test: fresh app ids, and how many commits conflicted."""

    examples: int = 0
    commits: int = 0
    conflicts: int = 0


@dataclass
class Pending:
    """An open unit of work, the calls made through it and what they returned."""

    session: Session
    ops: list[Op] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)


class SerialEquivalence(RuleBasedStateMachine):
    """Interleaved units of work against the serial model; see the module docstring.

    With ``lanes``, each slot is run as the dispatcher runs a partition: its units read
    through the slot's Snapshot of what it committed before, absorb their commit into it,
    forget what a conflict names, and retry on the locked path (Store.session). Without,
    every unit starts from nothing and retries optimistically.
    """

    def __init__(self, run: Callable[[Coroutine[Any, Any, _T]], _T], store: Store, stats: Stats, lanes: bool) -> None:
        super().__init__()
        stats.examples += 1
        self.run = run
        self.store = store
        self.stats = stats
        # One database for all examples: each example's apps are fresh, so it starts empty.
        self.app_ids = (f"x{stats.examples}-a", f"x{stats.examples}-b")
        self.snapshots = [Snapshot() if lanes else None for _ in range(SLOTS)]
        self.model: Model = {}
        self.open: dict[int, Pending] = {}

    def _known_ids(self) -> list[str]:
        created = [r for p in self.open.values() for op, r in zip(p.ops, p.results, strict=True) if isinstance(op, Create)]
        return [rid for _, rid in self.model] + created

    @rule(slot=st.integers(0, SLOTS - 1), data=st.data())
    def call(self, slot: int, data: st.DataObject) -> None:
        """A few calls in unit ``slot`` (opening it if needed)."""
        pending = self.open.setdefault(slot, Pending(Session(self.store, self.app_ids, self.snapshots[slot])))
        for op in data.draw(st.lists(calls(self._known_ids()), min_size=1, max_size=3), label="calls"):
            pending.results.append(self.run(perform(op, pending.session)))
            pending.ops.append(op)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        """Commit one open unit; on conflict, run its calls again on a fresh unit and commit that."""
        slot = data.draw(st.sampled_from(sorted(self.open)), label="commit slot")
        pending = self.open.pop(slot)
        snapshot = self.snapshots[slot]
        try:
            new_versions = self.run(self.store.commit(pending.session.unit))
        except VersionConflict as exc:
            self.stats.conflicts += 1
            if snapshot is not None:
                snapshot.forget(exc.keys) if exc.keys is not None else snapshot.clear()
            pending = self.run(self._retry(pending.ops, snapshot, pending.session.unit))
        else:
            if snapshot is not None:
                snapshot.absorb(pending.session.unit, new_versions)
        self.stats.commits += 1
        model = dict(self.model)
        for op, actual in zip(pending.ops, pending.results, strict=True):
            assert actual == expected(op, model, actual), f"{op} returned {actual!r}; serial execution gives otherwise"
        self.model = model

    async def _retry(self, ops: list[Op], snapshot: Snapshot | None, failed: UnitOfWork) -> Pending:
        # Nothing else commits in between, so the retry must not conflict.
        if snapshot is None:
            retry = Pending(Session(self.store, self.app_ids), list(ops))
            retry.results = [await perform(op, retry.session) for op in ops]
            await self.store.commit(retry.session.unit)
            return retry
        async with self.store.session() as locked:
            # As the dispatcher's locked attempt does after an unlocked run: lock what the
            # conflicted unit read and wrote, then run the calls again within the locks.
            assert not await locked.revalidate(failed, snapshot), "a unit that conflicted must find a change"
            retry = Pending(Session(locked, self.app_ids, snapshot), list(ops))
            retry.results = [await perform(op, retry.session) for op in ops]
            new_versions = await locked.commit(retry.session.unit)
        snapshot.absorb(retry.session.unit, new_versions)
        return retry

    @invariant()
    def store_holds_the_models_records(self) -> None:
        """The committed records of both apps are exactly the model's."""
        for app, app_id in enumerate(self.app_ids):
            stored = {r.id: (json.loads(r.data), frozenset(r.associations)) for r in self.run(self.store.app_records(app_id))}
            assert stored == {rid: value for (a, rid), value in self.model.items() if a == app}


def _check(url: str, *, lanes: bool, examples: int, steps: int = 40) -> Stats:
    stats = Stats()
    with asyncio.Runner() as runner:
        store: Store = runner.run(_open(url))
        try:
            run_state_machine_as_test(
                lambda: SerialEquivalence(runner.run, store, stats, lanes),
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=steps,
                    deadline=None,
                    derandomize=True,  # the same examples on every run: CI stays reproducible
                    database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
        finally:
            runner.run(store.close())
    return stats


async def _open(url: str) -> Store:
    store = Store.from_settings(PersistenceSettings(url=url))  # type: ignore[arg-type]
    await store.upgrade()
    return store


# Shrinking a failure can take Hypothesis up to five minutes on a database: let it finish,
# so a failure reports the shortest sequence of calls instead of a timeout.
@pytest.mark.timeout(900)
class TestSerialEquivalence:
    @pytest.mark.parametrize("lanes", [False, True], ids=["fresh-units", "dispatcher-lanes"])
    def test_interleaved_units_on_sqlite_equal_serial_execution(self, sqlite_url: str, lanes: bool) -> None:
        """Random interleaved units on SQLite: every committed unit's results and the store equal the serial model."""
        stats = _check(sqlite_url, lanes=lanes, examples=30)
        assert stats.conflicts > 0, "no unit conflicted: the interleavings did not exercise the version checks"

    @pytest.mark.postgres
    def test_interleaved_dispatcher_lanes_on_postgres_equal_serial_execution(self, postgres_url: str) -> None:
        """The same on PostgreSQL, as the dispatcher runs units (snapshots, locked retries), with fewer examples."""
        stats = _check(postgres_url, lanes=True, examples=12)
        assert stats.conflicts > 0, "no unit conflicted: the interleavings did not exercise the version checks"
