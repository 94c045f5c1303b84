"""The unit of work: what one transaction read, at which versions, and what it will write.

A unit spans one batch of events of one partition (one event in the simplest case). Handler
runs read through it (misses go to the database, hits are served from what it already read
or wrote) and stage writes into it; a failed run is undone with :meth:`UnitOfWork.rollback_to`.
The store commits it in one transaction only if every key version in ``seen`` is unchanged,
so read-increment-write by any number of workers counts exactly. Nothing here touches the
database directly: misses go through the :class:`Loader` the store provides.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from worker.errors import InvalidDataError, RecordNotFoundError
from worker.persistence.associations import Association
from worker.persistence.keys import ROOM_PREFIX, Key, Marker, RecordRef, association_key, guard_association, guard_key, id_key, scoped
from worker.persistence.records import OutboxMessage, StoredRecord
from worker.persistence.values import check_associations, check_record_id, encode_data

_T = TypeVar("_T")


class HandedOut(Protocol):
    """An accessor call handed to a handler as an awaitable: its name, and whether it was awaited."""

    awaited: bool

    @property
    def name(self) -> str:
        """The call as written."""


class Loader(Protocol):
    """How a unit of work reads what it has not seen yet; the store implements it."""

    async def load_by_ids(self, keys: Sequence[Key], app_id: str, ids: Sequence[str]) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys`` (absent: 0), then the records with those ids, in one snapshot."""
        ...

    async def load_by_associations(
        self, keys: Sequence[Key], app_id: str, associations: Sequence[str]
    ) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records having every one of ``associations``."""
        ...

    async def load_by_any_association(
        self, keys: Sequence[Key], app_id: str, associations: Sequence[str]
    ) -> tuple[dict[Key, int], list[StoredRecord]]:
        """Versions of ``keys``, then the records having at least one of ``associations``."""
        ...

    async def processed(self, markers: Sequence[Marker]) -> set[Marker]:
        """Which of ``markers`` are already recorded as processed."""
        ...


class Cached(Protocol):
    """What a unit reads from before the database: a snapshot (``snapshot.py``) of earlier units."""

    versions: dict[Key, int]
    records: dict[RecordRef, StoredRecord | None]
    queries: dict[tuple[str, tuple[str, ...]], tuple[str, ...]]


_DELETED = None  # a staged value of None means "removed in this unit"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Where :meth:`UnitOfWork.rollback_to` goes back to: the staged part, never the reads."""

    journal: int
    outbox: int
    markers: int


# One undo step of a staging structure: ("dict", d, key, old value or _ABSENT), ("added",
# s, key, None) or ("removed", s, key, None). A journal instead of copies keeps a checkpoint
# O(1), where copying the staged state before every handler run made a batch quadratic.
_ABSENT: Any = object()
_Undo = tuple[str, Any, Any, Any]


@dataclass(slots=True)
class UnitOfWork:
    """Reads with the versions they saw, and writes staged until commit."""

    loader: Loader
    snapshot: Cached | None = None
    seen: dict[Key, int] = field(default_factory=dict)
    base: dict[RecordRef, StoredRecord | None] = field(default_factory=dict)
    queries: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = field(default_factory=dict)
    # Queries answered from their guard's records (see _derive), and those records by association.
    derived: set[tuple[str, tuple[str, ...]]] = field(default_factory=set)
    # Apps that read all of a room's records (directly, or to answer a query in the room):
    # the dispatcher prefetches the rooms of their next batch (see prefetch).
    room_readers: set[str] = field(default_factory=set)
    # The rooms of this unit's events (set by the dispatcher), and the apps they were read
    # ahead for: an app's first read of one of them reads them all (see _load_query).
    rooms_ahead: frozenset[str] = frozenset()
    read_ahead: set[str] = field(default_factory=set)
    _indexes: dict[tuple[str, tuple[str, ...]], dict[str, list[StoredRecord]]] = field(default_factory=dict)
    staged: dict[RecordRef, StoredRecord | None] = field(default_factory=dict)
    created: set[RecordRef] = field(default_factory=set)
    written: set[Key] = field(default_factory=set)
    outbox: list[OutboxMessage] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    # Records created in this unit by (app id, association): association reads look here
    # instead of scanning every created record.
    created_by_association: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    journal: list[_Undo] = field(default_factory=list)
    #: The first database failure seen by a read: the dispatcher re-raises it after the
    #: handler returns, so a handler that swallows errors cannot commit on a failed read.
    failure: Exception | None = None
    #: Accessor calls handed out since the last :meth:`take_unawaited`: a call a handler
    #: never awaited never ran, and the dispatcher must fail the run rather than lose it.
    handed_out: list[HandedOut] = field(default_factory=list)

    # -- reads ---------------------------------------------------------------------------

    async def read(self, app_id: str, record_id: str) -> StoredRecord | None:
        """The record as this unit sees it: staged if written here, else as read from the database."""
        check_record_id(app_id, record_id)
        ref = (app_id, record_id)
        if ref in self.staged:
            return self.staged[ref]
        if ref not in self.base and not self._adopt_record(ref):
            key = id_key(app_id, record_id)
            versions, rows = await self._guard(self.loader.load_by_ids(self._unseen([key]), app_id, [record_id]))
            self._remember(versions, rows, app_id)
            self.base.setdefault(ref, None)
            self.seen.setdefault(key, 0)
        return self.base[ref]

    async def read_by_associations(self, app_id: str, associations: Sequence[Association]) -> list[StoredRecord]:
        """Records of ``app_id`` having every one of ``associations``, this unit's writes applied."""
        if not associations:
            raise InvalidDataError(f"app {app_id!r}: a query by associations needs at least one association")
        wanted = (str(associations[0]),) if len(associations) == 1 else tuple(sorted({str(a) for a in associations}))
        query = (app_id, wanted)
        if query not in self.queries and not self._adopt_query(query):
            # Checked before the database sees it; a query this unit or the snapshot knows was.
            check_associations(app_id, wanted)
            guard = guard_association(wanted)
            if len(wanted) > 1 and scoped(guard):
                await self._derive(query, guard)
            else:
                await self._load_query(query)
        return self.query_result(query)

    async def _load_query(self, query: tuple[str, tuple[str, ...]]) -> None:
        app_id, wanted = query
        if len(wanted) == 1 and wanted[0] in self.rooms_ahead and app_id not in self.read_ahead:
            # The app reads rooms, and the dispatcher had not learned it yet (a worker's or a
            # replay's first unit): read all of the unit's rooms now rather than one per event.
            self.room_readers.add(app_id)
            with contextlib.suppress(InvalidDataError):  # another room's id: this read is fine alone
                await self.prefetch(app_id, sorted(self.rooms_ahead))
            if query in self.queries:
                return
        key = guard_key(app_id, wanted)
        versions, rows = await self._guard(self.loader.load_by_associations(self._unseen([key]), app_id, wanted))
        self._remember(versions, rows, app_id)
        self.seen.setdefault(key, 0)
        self.queries[query] = tuple(row.id for row in rows)
        if len(wanted) == 1 and wanted[0].startswith(ROOM_PREFIX):
            self.room_readers.add(app_id)

    async def prefetch(self, app_id: str, associations: Iterable[str]) -> None:
        """Read every record of each of ``associations`` (rooms, say) in one round trip.

        What a handler then asks of one of them is answered here, as if it had asked for all
        of its records first: the reads are checked at commit like any other. A batch of
        events in many rooms then costs one read, not one per room seen for the first time.
        """
        self.read_ahead.add(app_id)
        missing = [a for a in associations if (app_id, (a,)) not in self.queries and not self._adopt_query((app_id, (a,)))]
        if not missing:
            return
        check_associations(app_id, missing)
        keys = [association_key(app_id, a) for a in missing]
        versions, rows = await self._guard(self.loader.load_by_any_association(self._unseen(keys), app_id, missing))
        self._remember(versions, rows, app_id)
        having: dict[str, list[str]] = {a: [] for a in missing}
        for row in rows:  # in id order, the order of a query's result
            for association in row.associations:
                if association in having:
                    having[association].append(row.id)
        for association, key in zip(missing, keys, strict=True):
            self.seen.setdefault(key, 0)
            self.queries[(app_id, (association,))] = tuple(having[association])

    async def _derive(self, query: tuple[str, tuple[str, ...]], guard: str) -> None:
        """Answer a query for several associations from every record of its guard association.

        Both are guarded by the same version key, so the whole set (read once, then kept in
        the snapshot) answers every later query it guards without a round trip: a room's
        records answer "this user's, in this room" for each user.
        """
        app_id, wanted = query
        whole = (app_id, (guard,))
        if whole not in self.queries and not self._adopt_query(whole):
            await self._load_query(whole)
        index = self._indexes.get(whole)
        if index is None:
            index = self._indexes[whole] = {}
            for record_id in self.queries[whole]:
                if (record := self.base.get((app_id, record_id))) is not None:
                    for association in record.associations:
                        index.setdefault(association, []).append(record)
        needed = set(wanted)
        fewest = min((index.get(a, []) for a in wanted if a != guard), key=len)
        self.queries[query] = tuple(record.id for record in fewest if needed.issubset(record.associations))
        self.derived.add(query)

    def query_result(self, query: tuple[str, tuple[str, ...]]) -> list[StoredRecord]:
        """The records of a query already run, this unit's writes applied."""
        app_id, wanted = query
        found: list[StoredRecord] = []
        wanted_set = set(wanted)
        # Ordered by record id, the database's order, with this unit's new records in place:
        # a repeated run, or another worker, sees the same order.
        for record_id in self.queries[query]:
            ref = (app_id, record_id)
            record = self.staged[ref] if ref in self.staged else self.base.get(ref)
            # A record removed and re-created here (update with upsert) has lost its associations.
            if record is not None and wanted_set.issubset(record.associations):
                found.append(record)
        if not self.created_by_association:
            return found
        # A record created here with all of ``wanted`` is in the index of each: look through
        # the smallest (one user's in a room, not the room's), and at none if one is empty.
        created: set[str] = set()
        for position, association in enumerate(wanted):
            ids = self.created_by_association.get((app_id, association))
            if not ids:
                return found
            if not position or len(ids) < len(created):
                created = ids
        from_database = set(self.queries[query])
        for record_id in sorted(created):
            record = self.staged.get((app_id, record_id))
            if record is not None and wanted_set.issubset(record.associations) and record_id not in from_database:
                found.append(record)
        found.sort(key=lambda record: record.id)
        return found

    async def already_processed(self, markers: Sequence[Marker]) -> set[Marker]:
        """Markers recorded by an earlier commit or staged earlier in this unit."""
        staged = set(self.markers)
        unknown = [m for m in markers if m not in staged]
        done = await self.loader.processed(unknown) if unknown else set()
        return done | (staged & set(markers))

    # -- writes --------------------------------------------------------------------------

    def create(self, app_id: str, data: Mapping[str, Any], associations: Iterable[Association], record_id: str | None = None) -> str:
        """Stage a new record; returns its id."""
        record_id = record_id or uuid.uuid4().hex
        check_record_id(app_id, record_id)
        ref = (app_id, record_id)
        record = StoredRecord(record_id, encode_data(data, app_id), 0, tuple(sorted({str(a) for a in associations})))
        check_associations(app_id, record.associations)
        self._set(self.staged, ref, record)
        if self.base.get(ref) is None:
            self._add(self.created, ref)
            for association in record.associations:
                index = self.created_by_association.get((app_id, association))
                if index is None:
                    index = self.created_by_association[(app_id, association)] = set()
                self._add(index, record_id)
        self._written(record.keys(app_id))
        return record_id

    async def update(self, app_id: str, record_id: str, data: Mapping[str, Any], upsert: bool) -> str:
        """Stage new data for one record (or create it, with upsert)."""
        encoded = encode_data(data, app_id)
        current = await self.read(app_id, record_id)
        if current is None:
            if not upsert:
                raise RecordNotFoundError(f"no record {record_id!r} of app {app_id!r}; pass upsert=True to create it")
            return self.create(app_id, data, (), record_id=record_id)
        self._stage(app_id, StoredRecord(current.id, encoded, current.version, current.associations))
        return record_id

    async def update_by_associations(
        self, app_id: str, associations: Sequence[Association], data: Mapping[str, Any], upsert: bool
    ) -> list[str]:
        """Stage new data for every record having all ``associations`` (or create one, with upsert)."""
        encoded = encode_data(data, app_id)
        matches = await self.read_by_associations(app_id, associations)
        if not matches:
            if not upsert:
                names = ", ".join(str(a) for a in associations)
                raise RecordNotFoundError(f"no record of app {app_id!r} has {names}; pass upsert=True to create one")
            return [self.create(app_id, data, associations)]
        for record in matches:
            self._stage(app_id, StoredRecord(record.id, encoded, record.version, record.associations))
        return [record.id for record in matches]

    async def remove(self, app_id: str, record_id: str) -> list[StoredRecord]:
        """Stage the removal of one record; returns it (empty when there was none)."""
        current = await self.read(app_id, record_id)
        if current is None:
            return []
        self._delete(app_id, current)
        return [current]

    async def remove_by_associations(self, app_id: str, associations: Sequence[Association]) -> list[StoredRecord]:
        """Stage the removal of every record having all ``associations``; returns them."""
        matches = await self.read_by_associations(app_id, associations)
        for record in matches:
            self._delete(app_id, record)
        return matches

    def publish(self, message: OutboxMessage) -> None:
        """Stage a record for the outbox; it is published only once the unit commits."""
        self.outbox.append(message)

    def mark_processed(self, marker: Marker) -> None:
        """Stage the marker that says this app has processed this event."""
        self.markers.append(marker)

    # -- handler runs --------------------------------------------------------------------

    def hand_out(self, call: HandedOut) -> None:
        """Track an accessor call given to a handler, so that one never awaited is found."""
        self.handed_out.append(call)

    def take_unawaited(self) -> list[str]:
        """The names of the calls handed out and never awaited since the last take; forgets them all."""
        names = [call.name for call in self.handed_out if not call.awaited]
        self.handed_out.clear()
        return names

    def checkpoint(self) -> Checkpoint:
        """Remember where the staged state is, so that a failed handler run can be undone."""
        return Checkpoint(len(self.journal), len(self.outbox), len(self.markers))

    def rollback_to(self, checkpoint: Checkpoint) -> None:
        """Undo every write staged since ``checkpoint``; what was read stays known."""
        while len(self.journal) > checkpoint.journal:
            kind, target, key, value = self.journal.pop()
            if kind == "added":
                target.discard(key)
            elif kind == "removed":
                target.add(key)
            elif value is _ABSENT:
                del target[key]
            else:
                target[key] = value
        del self.outbox[checkpoint.outbox :]
        del self.markers[checkpoint.markers :]
        self.handed_out.clear()

    @property
    def is_empty(self) -> bool:
        """True when committing would change nothing but the partition offset."""
        return not (self.written or self.outbox or self.markers)

    # -- internals -----------------------------------------------------------------------

    async def _guard(self, load: Awaitable[_T]) -> _T:
        try:
            return await load
        except Exception as exc:
            self.failure = self.failure or exc
            raise

    def _adopt_record(self, ref: RecordRef) -> bool:
        """Take a record read by id from the snapshot, with the version to check."""
        key = id_key(*ref)
        if self.snapshot is None or ref not in self.snapshot.records or not self._agrees(self.snapshot, [key]):
            return False
        self.base[ref] = self.snapshot.records[ref]
        self.seen.setdefault(key, self.snapshot.versions[key])
        return True

    def _adopt_query(self, query: tuple[str, tuple[str, ...]]) -> bool:
        """Take an association query's result from the snapshot, with the versions to check."""
        snapshot = self.snapshot
        if snapshot is None or query not in snapshot.queries:
            return False
        app_id, wanted = query
        key = guard_key(app_id, wanted)
        ids = snapshot.queries[query]
        # _agrees also refuses a result older than a version of its guard this unit has
        # already read from the database: checking the newer version at commit would miss it.
        if not self._agrees(snapshot, [key]) or any((app_id, i) not in snapshot.records for i in ids):
            return False
        self.seen.setdefault(key, snapshot.versions[key])
        for record_id in ids:
            self.base.setdefault((app_id, record_id), snapshot.records[(app_id, record_id)])
        self.queries[query] = ids
        return True

    def _agrees(self, snapshot: Cached, keys: Sequence[Key]) -> bool:
        """Whether the snapshot knows ``keys`` at the versions this unit has already seen.

        A unit that read a key from the database at a newer version must not then take an
        older cached result for it: the commit would check the newer version and pass.
        """
        for key in keys:
            version = snapshot.versions.get(key)
            if version is None or self.seen.get(key, version) != version:
                return False
        return True

    def _unseen(self, keys: Iterable[Key]) -> list[Key]:
        return [key for key in keys if key not in self.seen]

    def _remember(self, versions: dict[Key, int], rows: list[StoredRecord], app_id: str) -> None:
        # The first version seen is the one checked at commit; a later, newer read of the same
        # key would only hide a change made since, so it never replaces the first.
        for key, version in versions.items():
            self.seen.setdefault(key, version)
        for row in rows:
            self.base.setdefault((app_id, row.id), row)

    def _stage(self, app_id: str, record: StoredRecord) -> None:
        self._set(self.staged, (app_id, record.id), record)
        self._written(record.keys(app_id))

    def _delete(self, app_id: str, record: StoredRecord) -> None:
        ref = (app_id, record.id)
        self._set(self.staged, ref, _DELETED)
        if ref in self.created:
            self.journal.append(("removed", self.created, ref, None))
            self.created.discard(ref)
        self._written(record.keys(app_id))

    def _set(self, target: dict[Any, Any], key: Any, value: Any) -> None:
        self.journal.append(("dict", target, key, target.get(key, _ABSENT)))
        target[key] = value

    def _add(self, target: set[Any], key: Any) -> None:
        if key not in target:
            self.journal.append(("added", target, key, None))
            target.add(key)

    def _written(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self._add(self.written, key)
