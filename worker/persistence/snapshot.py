"""A lane's (or a worker's) memory of the database between units of work.

The next unit of work reads from it instead of the database; what it uses is still checked
at commit like any other read, so a stale entry costs a conflict, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from worker.persistence.keys import Key, RecordRef, guard_key, id_key
from worker.persistence.unit import StoredRecord

if TYPE_CHECKING:
    from worker.persistence.unit import UnitOfWork

# A lane's snapshot is dropped whole past this many keys, which bounds a worker's memory.
SNAPSHOT_MAX_KEYS = 50_000


@dataclass(slots=True)
class Snapshot:
    """What one partition's lane knows of the database after its last commit.

    The next unit of work of that lane reads from it instead of the database; what it uses
    is still checked at commit like any other read, so a stale entry costs a conflict, never
    a wrong result. Rooms map to partitions, so most of a lane's keys are written by that
    lane alone and stay valid from batch to batch.
    """

    versions: dict[Key, int] = field(default_factory=dict)
    records: dict[RecordRef, StoredRecord | None] = field(default_factory=dict)
    queries: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = field(default_factory=dict)

    def forget(self, keys: Iterable[Key]) -> None:
        """Drop the versions of ``keys`` and whatever was read through them."""
        stale = set(keys)
        if not stale:
            return
        for key in stale:
            self.versions.pop(key, None)
        for ref, record in list(self.records.items()):
            keys_of = record.keys(ref[0]) if record is not None else [id_key(*ref)]
            if any(key in stale for key in keys_of):
                del self.records[ref]
        for query in list(self.queries):
            if guard_key(*query) in stale:
                del self.queries[query]

    def clear(self) -> None:
        """Forget everything."""
        self.versions.clear()
        self.records.clear()
        self.queries.clear()

    def learn(self, unit: UnitOfWork) -> None:
        """Take over what ``unit`` read, though it did not commit: entries are checked when used."""
        if len(self.versions) > SNAPSHOT_MAX_KEYS:
            self.clear()
        # Where the unit read a newer version from the database, what this snapshot derived
        # from the older one (queries, records) is stale: kept beside the newer version, a
        # later unit would adopt it and its commit check would pass.
        self.forget([key for key, version in unit.seen.items() if self.versions.get(key, version) != version])
        self.versions.update(unit.seen)
        self.records.update(unit.base)
        # Derived queries are not kept: the guard's records they came from answer them again.
        self.queries.update((query, ids) for query, ids in unit.queries.items() if query not in unit.derived)

    def absorb(self, unit: UnitOfWork, new_versions: Mapping[Key, int]) -> None:
        """Take over what ``unit`` read and wrote, now that it has committed."""
        self.learn(unit)
        self.versions.update(new_versions)
        for ref, record in unit.staged.items():
            version = new_versions.get(id_key(*ref))
            self.records[ref] = (
                None if record is None or version is None else StoredRecord(record.id, record.data, version, record.associations)
            )
        # A query whose association was written by this unit is now what the unit saw.
        for query in unit.queries:
            if query not in unit.derived:
                self.queries[query] = tuple(r.id for r in unit.query_result(query))
        for query in list(self.queries):
            if query not in unit.queries and guard_key(*query) in unit.written:
                del self.queries[query]
