"""The SQL pieces the store and the admin code share: statements, row codecs, chunking, error translation, SQLite setup."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import orjson
from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError as DBAPIDataError
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from worker.errors import DataError, PersistenceError, VersionConflict
from worker.persistence.schema import (
    record_associations,
    records,
)
from worker.persistence.unit import StoredRecord

# PostgreSQL's codes for "try again": serialization failure, deadlock, and lock_timeout
# expired (what an optimistic commit gets instead of waiting behind a locked one).
_RETRY_SQLSTATES = {"40001", "40P01", "55P03"}
# unique_violation: another unit inserted the same row first, a conflict like any other. Every
# other integrity error (not null, check, foreign key), and every data exception (class 22:
# too long, NUL, bad encoding), is the data's fault and fails again however often it is tried.
_UNIQUE_VIOLATION = "23505"
_DATA_SQLSTATE_CLASSES = ("22", "23")
# How long an optimistic commit waits for a row lock before it counts as a conflict. Locked
# units take their keys in key order too, but may lock a key they had not foreseen later;
# giving way quickly breaks any such cycle long before deadlock detection (1 s) would.
OPTIMISTIC_LOCK_TIMEOUT = "200ms"
_T = TypeVar("_T")

# Rows per multi-row statement (every writer of the package uses it): far below SQLite's 32,766 bound parameters.
CHUNK = 400


def dialect_insert(is_sqlite: bool, table: Table) -> Any:
    """The dialect's INSERT: both have on_conflict_do_update/nothing with the same arguments."""
    return sqlite.insert(table) if is_sqlite else postgresql.insert(table)


def by_ids(app_id: str, ids: Sequence[str]) -> Any:
    """The records of an app with these ids."""
    return select(records).where(records.c.app_id == app_id, records.c.id.in_(ids))


def by_associations(app_id: str, associations: Sequence[str]) -> Any:
    """The records of an app that have every one of these associations, by id."""
    having_all = (
        select(record_associations.c.record_id)
        .where(record_associations.c.app_id == app_id, record_associations.c.association.in_(associations))
        .group_by(record_associations.c.record_id)
        .having(func.count() == len(set(associations)))
    )
    return select(records).where(records.c.app_id == app_id, records.c.id.in_(having_all)).order_by(records.c.id)


def by_any_association(app_id: str, associations: Sequence[str]) -> Any:
    """The records of an app that have at least one of these associations, by id."""
    having_one = select(record_associations.c.record_id).where(
        record_associations.c.app_id == app_id, record_associations.c.association.in_(associations)
    )
    return select(records).where(records.c.app_id == app_id, records.c.id.in_(having_one)).order_by(records.c.id)


def configure_sqlite(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    """WAL for concurrent readers; BEGIN IMMEDIATE so a writer waits for the lock up front."""
    from sqlalchemy import event

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us emit BEGIN ourselves: the driver's own deferred BEGIN would take the write
        # lock only at the first write, where a busy database fails instead of waiting.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("rc_write") else "BEGIN")


def count_round_trips(engine: AsyncEngine, count: Callable[[int], None]) -> None:
    """Call ``count(1)`` for each statement, BEGIN, COMMIT and ROLLBACK ``engine`` sends: its round trips."""
    from sqlalchemy import event

    def one(*_args: Any, **_kwargs: Any) -> None:
        count(1)

    # SQLite's BEGIN is a statement of its own (configure_sqlite), counted as one already.
    names = (
        ("before_cursor_execute", "commit", "rollback")
        if engine.dialect.name == "sqlite"
        else ("before_cursor_execute", "begin", "commit", "rollback")
    )
    for name in names:
        event.listen(engine.sync_engine, name, one)


@contextlib.contextmanager
def translate(action: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors into the worker's own, chained."""
    try:
        yield
    except DBAPIError as exc:
        code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if code in _RETRY_SQLSTATES:
            raise VersionConflict(f"{action}: concurrent change (SQLSTATE {code})", keys=frozenset()) from exc
        if _refuses_data(exc, code):
            raise DataError(f"{action}: the database refused a value: {exc.orig}") from exc
        if isinstance(exc, IntegrityError):
            raise VersionConflict(f"{action}: concurrent change ({type(exc.orig).__name__})") from exc
        raise PersistenceError(f"{action} failed: {exc.orig}") from exc
    except UnicodeError as exc:  # sqlite3 binds str itself, and refuses a lone surrogate so
        raise DataError(f"{action}: the database refused a value: {exc}") from exc
    except (OSError, TimeoutError) as exc:  # the driver could not reach the server at all
        raise PersistenceError(f"{action} failed: {type(exc).__name__}: {exc}") from exc
    # Other SQLAlchemyErrors are bugs in the statements above: they propagate unchanged.


def _refuses_data(exc: DBAPIError, code: str | None) -> bool:
    """Whether the database refused the data itself: the same statement would fail again."""
    if code is not None:
        return code.startswith(_DATA_SQLSTATE_CLASSES) and code != _UNIQUE_VIOLATION
    # sqlite3 has no SQLSTATE: its DataError ("string or blob too big") and any integrity
    # error but a uniqueness one (a concurrent insert) are the data's.
    if isinstance(exc, DBAPIDataError):
        return True
    return isinstance(exc, IntegrityError) and "UNIQUE constraint failed" not in str(exc.orig)


def stored(row: Any) -> StoredRecord:
    """A records row as the unit of work's StoredRecord."""
    return StoredRecord(row.id, row.data.encode(), row.version, tuple(orjson.loads(row.associations)))


def chunks(items: Sequence[_T], size: int = CHUNK) -> Iterator[Sequence[_T]]:
    """``items`` in slices of at most ``size``: one multi-row statement each."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    """Kafka headers as the outbox stores them: JSON of [name, base64] pairs."""
    return orjson.dumps([[name, base64.b64encode(value).decode()] for name, value in headers]).decode()


def decode_headers(text: str) -> tuple[tuple[str, bytes], ...]:
    """The outbox's stored headers back as Kafka headers."""
    return tuple((name, base64.b64decode(value)) for name, value in orjson.loads(text))
