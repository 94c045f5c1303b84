r"""How bytes from events become text on a page: shown safely, never interpreted.

Jinja2 escapes everything (autoescape); these helpers make bytes printable first, so that
invalid UTF-8 and control characters show as ``\\xNN`` rather than vanish or break the page.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import orjson

# C0 and C1 controls except tab and newline, and the Unicode line separators.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: bytes | str | None) -> str:
    r"""Text for any bytes: UTF-8 where valid, ``\\xNN`` for the rest and for control characters."""
    if value is None:
        return ""
    text = value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def pretty(value: bytes | str | None) -> str:
    """JSON indented when the value is JSON, else :func:`printable`."""
    if value is None:
        return "(no value)"
    try:
        document: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return printable(value)
    return printable(orjson.dumps(document, option=orjson.OPT_INDENT_2))


def when(moment: datetime | float | None) -> str:
    """A time as ISO 8601 UTC to the second; numbers are epoch milliseconds."""
    if moment is None:
        return "-"
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment / 1000, UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(moment: datetime | str | None, now: datetime | None = None) -> str:
    """How long ago, e.g. ``3m 12s ago``."""
    if moment is None:
        return "-"
    if isinstance(moment, str):
        try:
            moment = datetime.fromisoformat(moment)
        except ValueError:
            return "-"
    seconds = int(((now or datetime.now(UTC)) - moment).total_seconds())
    if seconds < 60:
        return f"{max(seconds, 0)}s ago"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds}s ago"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m ago"
