"""Record values as the database stores them: ids and associations checked against its limits, data as JSON bytes.

The unit of work checks every id and association a handler hands it here, and encodes
record data here, so a value the database cannot store fails its event when staged, not
the batch at commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from worker import limits
from worker.errors import InvalidDataError


def check_record_id(app_id: str, record_id: str) -> None:
    """Refuse a record id the database cannot store, naming the app and the problem."""
    if not isinstance(record_id, str) or not record_id:
        raise InvalidDataError(f"app {app_id!r}: a record id must be a non-empty string, not {record_id!r}")
    problem = limits.text_problem(record_id, limits.RECORD_ID_MAX)
    if problem is not None:
        raise InvalidDataError(f"app {app_id!r}: record id {_shown(record_id)} {problem}")


def check_associations(app_id: str, associations: Iterable[str]) -> None:
    """Refuse associations ("model:id") the database cannot store, naming the app and the problem."""
    for association in associations:
        problem = limits.text_problem(association, limits.ASSOCIATION_MAX)
        if problem is not None:
            raise InvalidDataError(f"app {app_id!r}: association {_shown(association)} {problem}")


def _shown(value: str) -> str:
    """A value for an error message: escaped, and cut short if long."""
    return repr(value) if len(value) <= 60 else f"{value[:60]!r}..."


def encode_data(data: Mapping[str, Any], app_id: str = "?") -> bytes:
    """Serialise record data, refusing anything that is not a JSON object of JSON values.

    Strings must be UTF-8 (no lone surrogates, in keys either), and numbers finite: orjson
    would write NaN and Infinity as null, changing the data without a word.
    """
    if not isinstance(data, Mapping):
        raise InvalidDataError(f"app {app_id!r}: record data must be a JSON object (a dict), not {type(data).__name__}")
    try:
        # orjson serialises dicts only; any other Mapping the signature allows is copied into one.
        encoded = orjson.dumps(data if isinstance(data, dict) else dict(data))
    except TypeError as exc:
        raise InvalidDataError(f"app {app_id!r}: record data is not JSON-serialisable: {exc}") from None
    # Only data with a null in it can have had a NaN or Infinity turned into one.
    if b"null" in encoded:
        problem = limits.non_finite(data)
        if problem is not None:
            raise InvalidDataError(f"app {app_id!r}: record data is not JSON-serialisable: {problem} (JSON has no NaN or Infinity)")
    return compact(encoded)


# orjson's output has a capacity of at least 4 KiB, whatever its length: a counter's 12
# bytes of JSON kept in a snapshot or a unit would hold 4 KiB each. Below this size a
# copy of exactly its length is cheaper than the slack it frees.
COMPACT_BELOW = 16 * 1024


def compact(encoded: bytes) -> bytes:
    """``encoded`` in a buffer of its own length, to be kept (see COMPACT_BELOW)."""
    return memoryview(encoded).tobytes() if len(encoded) < COMPACT_BELOW else encoded


def decode_data(data: bytes) -> dict[str, Any]:
    """A fresh dict of record data: callers may change it without touching the cache."""
    value: dict[str, Any] = orjson.loads(data)
    return value
