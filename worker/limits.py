"""What the database can store: the column lengths of the schema, and the check of a value against them.

The schema (``persistence/schema.py``) sizes its columns with these constants (a test holds
the migrations to the schema), and the decoder, the unit of work and the plugin loader check
values with :func:`text_problem` before anything is staged, so the two cannot drift apart. A
value past them would fail only at commit, and there for the whole batch; refused where it
enters, it costs one dead letter. Standard library only: the decoder sits below persistence.
"""

from __future__ import annotations

import math
from typing import Any

# Column lengths, in characters (PostgreSQL's VARCHAR(n) counts characters; SQLite does not
# enforce them at all, so the checks are what keeps both backends alike).
APP_ID_MAX = 200
RECORD_ID_MAX = 200
ASSOCIATION_MAX = 600  # "model:id", the whole text
VERSION_KEY_MAX = 700  # "id:<record id>" or "as:<association>": the longest of those fits
EVENT_SOURCE_MAX = 500  # CloudEvents source, part of the processed-event marker
EVENT_ID_MAX = 500  # CloudEvents id, part of the processed-event marker
# The message, room and sender ids of an event: handlers use them as record ids and in
# associations, so they are held to the shorter of those.
MESSAGE_REF_ID_MAX = RECORD_ID_MAX
# Topics, group ids and worker names: from the configuration, never from an event (Kafka's
# own limit on a topic name is 249).
NAME_MAX = 250


def text_problem(value: str, limit: int) -> str | None:
    r"""Why ``value`` cannot be stored in a column of ``limit`` characters, or None if it can.

    PostgreSQL refuses NUL in text and anything that is not UTF-8 (a lone surrogate, which
    Python's own JSON parser produces from ``"\udcff"``); SQLite refuses the surrogate too.
    """
    if len(value) > limit:
        return f"is {len(value)} characters long, over the limit of {limit}"
    if value.isascii() and "\x00" not in value:
        return None  # the common case, checked without encoding a copy
    if "\x00" in value:
        return f"holds a NUL character at {value.index(chr(0))}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not encodable as UTF-8 (lone surrogate {value[exc.start]!r} at {exc.start})"
    return None


def non_finite(value: Any, path: str = "data") -> str | None:
    """Where JSON ``value`` holds NaN or Infinity, e.g. ``"data.score is nan"``, or None.

    JSON has no such numbers: serialisers write them as null, losing them silently. Iterative,
    so deep data cannot exhaust the stack.
    """
    pending: list[tuple[str, Any]] = [(path, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return f"{where} is {item}"
        if isinstance(item, dict):
            pending.extend((f"{where}.{key}", child) for key, child in item.items())
        elif isinstance(item, list | tuple):
            pending.extend((f"{where}[{index}]", child) for index, child in enumerate(item))
    return None
