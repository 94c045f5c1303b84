"""The persistence accessors a handler is handed, bound to one app and one unit of work.

They hold the app id themselves, so no call of one app can name another app's records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from worker.apps.contract import Record
from worker.persistence.associations import Association
from worker.persistence.unit import StoredRecord, UnitOfWork, decode_data


def _record(stored: StoredRecord) -> Record:
    return Record(stored.id, decode_data(stored.data), stored.version, tuple(Association.parse(a) for a in stored.associations))


def _associations(associations: Sequence[Association]) -> list[Association]:
    # A bare Association where a list is expected is a common slip; say so at the call.
    if isinstance(associations, Association | str):
        raise TypeError("pass a list of Association, or use the *_by_association form for one")
    return list(associations)


class PersistenceReader:
    """``read.get_persistence_reader()``: reads of one app's records through the unit of work."""

    __slots__ = ("_app_id", "_unit")

    def __init__(self, unit: UnitOfWork, app_id: str) -> None:
        self._unit = unit
        self._app_id = app_id

    async def read(self, record_id: str) -> dict[str, Any] | None:
        """The data of the record with this id, or None."""
        stored = await self._unit.read(self._app_id, record_id)
        return decode_data(stored.data) if stored is not None else None

    async def read_by_association(self, association: Association) -> list[dict[str, Any]]:
        """The data of every record having ``association``."""
        return await self.read_by_associations([association])

    async def read_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """The data of every record having all of ``associations``."""
        found = await self._unit.read_by_associations(self._app_id, _associations(associations))
        return [decode_data(stored.data) for stored in found]

    async def read_record(self, record_id: str) -> Record | None:
        """The record with this id, versioned, or None."""
        stored = await self._unit.read(self._app_id, record_id)
        return _record(stored) if stored is not None else None

    async def read_records_by_association(self, association: Association) -> list[Record]:
        """Every record having ``association``, versioned."""
        return await self.read_records_by_associations([association])

    async def read_records_by_associations(self, associations: Sequence[Association]) -> list[Record]:
        """Every record having all of ``associations``, versioned."""
        return [_record(s) for s in await self._unit.read_by_associations(self._app_id, _associations(associations))]


class PersistenceWriter:
    """``persistence``: staged writes to one app's records, committed with the unit of work."""

    __slots__ = ("_app_id", "_unit")

    def __init__(self, unit: UnitOfWork, app_id: str) -> None:
        self._unit = unit
        self._app_id = app_id

    async def create(self, data: Mapping[str, Any]) -> str:
        """Create a record; returns its id."""
        return self._unit.create(self._app_id, data, ())

    async def create_with_association(self, data: Mapping[str, Any], association: Association) -> str:
        """Create a record with one association; returns its id."""
        return self._unit.create(self._app_id, data, [association])

    async def create_with_associations(self, data: Mapping[str, Any], associations: Sequence[Association]) -> str:
        """Create a record with several associations; returns its id."""
        return self._unit.create(self._app_id, data, _associations(associations))

    async def update(self, record_id: str, data: Mapping[str, Any], upsert: bool = False) -> str:
        """Replace the data of a record (or create it with this id, with upsert)."""
        return await self._unit.update(self._app_id, record_id, data, upsert)

    async def update_by_association(self, association: Association, data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having ``association``; returns their ids."""
        return await self._unit.update_by_associations(self._app_id, [association], data, upsert)

    async def update_by_associations(self, associations: Sequence[Association], data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having all ``associations``; returns their ids."""
        return await self._unit.update_by_associations(self._app_id, _associations(associations), data, upsert)

    async def remove(self, record_id: str) -> list[dict[str, Any]]:
        """Remove a record; returns the data removed."""
        return [decode_data(s.data) for s in await self._unit.remove(self._app_id, record_id)]

    async def remove_by_association(self, association: Association) -> list[dict[str, Any]]:
        """Remove every record having ``association``; returns the data removed."""
        return await self.remove_by_associations([association])

    async def remove_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """Remove every record having all ``associations``; returns the data removed."""
        removed = await self._unit.remove_by_associations(self._app_id, _associations(associations))
        return [decode_data(s.data) for s in removed]
