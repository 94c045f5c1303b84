"""The persistence accessors a handler is handed, bound to one app and one unit of work.

They hold the app id themselves, so no call of one app can name another app's records.
Each call returns a tracked coroutine that runs only when awaited: the unit of work knows
which calls were handed out and never awaited, and the dispatcher fails such a run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from worker.apps.accessors import Record
from worker.persistence.associations import Association
from worker.persistence.records import StoredRecord
from worker.persistence.unit import UnitOfWork
from worker.persistence.values import decode_data

_P = ParamSpec("_P")
_T = TypeVar("_T")
_A = TypeVar("_A", bound="_Accessor")


class TrackedCall(Coroutine[Any, Any, _T]):
    """One accessor call: it starts when first awaited, and tells the unit of work whether it was.

    A real coroutine to asyncio (``gather``, ``create_task`` and ``wait_for`` take it), but
    the work is only created on the first await, so a call never awaited has done nothing
    and leaves no "never awaited" warning behind: the dispatcher's error says it instead.
    It holds the call's parts rather than closures over them: several calls per event.
    """

    __slots__ = ("_accessor", "_args", "_closed", "_coroutine", "_kwargs", "_method", "_name", "awaited")

    def __init__(
        self,
        accessor: _Accessor,
        method: Callable[..., Coroutine[Any, Any, _T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._accessor, self._method, self._args, self._kwargs = accessor, method, args, kwargs
        # The call as the error shows it, made only if asked for: describing every call's
        # arguments was a sixth of a handler run's cost, and nearly every call is awaited.
        self._name: str | None = None
        self.awaited = self._closed = False
        self._coroutine: Coroutine[Any, Any, _T] | None = None
        accessor._unit.hand_out(self)

    @property
    def name(self) -> str:
        """The call as written, for instance ``persistence.create({'n': 1})``."""
        if self._name is None:
            self._name = f"{self._accessor._prefix}.{self._method.__name__}({_describe(self._args, self._kwargs)})"
        return self._name

    def _started(self) -> Coroutine[Any, Any, _T]:
        if self._coroutine is None:
            if self._closed:
                raise RuntimeError(f"{self.name} was closed before it was awaited")
            self.awaited = True
            self._coroutine = self._method(self._accessor, *self._args, **self._kwargs)
        return self._coroutine

    def __await__(self) -> Generator[Any, None, _T]:
        return self._started().__await__()

    def send(self, value: Any) -> Any:
        """Part of the coroutine protocol, for event loops that drive it directly."""
        return self._started().send(value)

    def throw(self, *args: Any) -> Any:
        """Part of the coroutine protocol."""
        return self._started().throw(*args)

    def close(self) -> None:
        """Part of the coroutine protocol; closing an unstarted call leaves it unawaited."""
        if self._coroutine is not None:
            self._coroutine.close()
        self._closed = True


class _Accessor:
    __slots__ = ("_app_id", "_unit")
    _prefix = ""

    def __init__(self, unit: UnitOfWork, app_id: str) -> None:
        self._unit = unit
        self._app_id = app_id


def _tracked(method: Callable[Concatenate[_A, _P], Coroutine[Any, Any, _T]]) -> Callable[Concatenate[_A, _P], Coroutine[Any, Any, _T]]:
    def call(self: _A, /, *args: _P.args, **kwargs: _P.kwargs) -> Coroutine[Any, Any, _T]:
        return TrackedCall(self, method, args, kwargs)

    functools.update_wrapper(call, method)
    return call


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    shown = ", ".join([*(_short(a) for a in args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])
    return shown if len(shown) <= 80 else shown[:77] + "..."


def _short(value: Any) -> str:
    if isinstance(value, Association):
        return f"<{value}>"
    if isinstance(value, list | tuple) and all(isinstance(a, Association) for a in value):
        return "[" + ", ".join(f"<{a}>" for a in value) + "]"
    return repr(value)


def _record(stored: StoredRecord) -> Record:
    return Record(stored.id, decode_data(stored.data), stored.version, tuple(Association.parse(a) for a in stored.associations))


def _data(stored: Sequence[StoredRecord]) -> list[dict[str, Any]]:
    return [decode_data(record.data) for record in stored]


def _associations(associations: Sequence[Association]) -> list[Association]:
    # A bare Association where a list is expected is a common slip; say so at the call.
    if isinstance(associations, Association | str):
        raise TypeError("pass a list of Association, or use the *_by_association form for one")
    return list(associations)


class PersistenceReader(_Accessor):
    """``read.get_persistence_reader()``: reads of one app's records through the unit of work.

    Results of association reads are ordered by record id.
    """

    __slots__ = ()
    _prefix = "read.get_persistence_reader()"

    # A repeated shape kept on purpose (issue 13), one kept group with App's check_/execute_ pairs
    # (contract.py), the readers' get_by_* (readers.py) and the persistence accessors (persistence.py):
    # the Apps-Engine's API is one typed method per name over a one-line body; generating them
    # would hide the signatures that handlers are written and type-checked against.
    @_tracked
    async def read(self, record_id: str) -> dict[str, Any] | None:
        """The data of the record with this id, or None."""
        stored = await self._unit.read(self._app_id, record_id)
        return decode_data(stored.data) if stored is not None else None

    @_tracked
    async def read_by_association(self, association: Association) -> list[dict[str, Any]]:
        """The data of every record having ``association``."""
        return _data(await self._unit.read_by_associations(self._app_id, [association]))

    @_tracked
    async def read_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """The data of every record having all of ``associations``."""
        return _data(await self._unit.read_by_associations(self._app_id, _associations(associations)))

    @_tracked
    async def read_record(self, record_id: str) -> Record | None:
        """The record with this id, versioned, or None."""
        stored = await self._unit.read(self._app_id, record_id)
        return _record(stored) if stored is not None else None

    @_tracked
    async def read_records_by_association(self, association: Association) -> list[Record]:
        """Every record having ``association``, versioned."""
        return [_record(s) for s in await self._unit.read_by_associations(self._app_id, [association])]

    @_tracked
    async def read_records_by_associations(self, associations: Sequence[Association]) -> list[Record]:
        """Every record having all of ``associations``, versioned."""
        return [_record(s) for s in await self._unit.read_by_associations(self._app_id, _associations(associations))]


class PersistenceWriter(_Accessor):
    """``persistence``: staged writes to one app's records, committed with the unit of work."""

    __slots__ = ()
    _prefix = "persistence"

    @_tracked
    async def create(self, data: Mapping[str, Any]) -> str:
        """Create a record; returns its id."""
        return self._unit.create(self._app_id, data, ())

    @_tracked
    async def create_with_association(self, data: Mapping[str, Any], association: Association) -> str:
        """Create a record with one association; returns its id."""
        return self._unit.create(self._app_id, data, [association])

    @_tracked
    async def create_with_associations(self, data: Mapping[str, Any], associations: Sequence[Association]) -> str:
        """Create a record with several associations; returns its id."""
        return self._unit.create(self._app_id, data, _associations(associations))

    @_tracked
    async def update(self, record_id: str, data: Mapping[str, Any], upsert: bool = False) -> str:
        """Replace the data of a record (or create it with this id, with upsert)."""
        return await self._unit.update(self._app_id, record_id, data, upsert)

    @_tracked
    async def update_by_association(self, association: Association, data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having ``association``; returns their ids."""
        return await self._unit.update_by_associations(self._app_id, [association], data, upsert)

    @_tracked
    async def update_by_associations(self, associations: Sequence[Association], data: Mapping[str, Any], upsert: bool = False) -> list[str]:
        """Replace the data of every record having all ``associations``; returns their ids."""
        return await self._unit.update_by_associations(self._app_id, _associations(associations), data, upsert)

    @_tracked
    async def remove(self, record_id: str) -> list[dict[str, Any]]:
        """Remove a record; returns the data removed."""
        return _data(await self._unit.remove(self._app_id, record_id))

    @_tracked
    async def remove_by_association(self, association: Association) -> list[dict[str, Any]]:
        """Remove every record having ``association``; returns the data removed."""
        return _data(await self._unit.remove_by_associations(self._app_id, [association]))

    @_tracked
    async def remove_by_associations(self, associations: Sequence[Association]) -> list[dict[str, Any]]:
        """Remove every record having all ``associations``; returns the data removed."""
        return _data(await self._unit.remove_by_associations(self._app_id, _associations(associations)))
