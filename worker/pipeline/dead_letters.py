"""Dead letters: built (the rc-dlq-* headers added to the record kept whole), recognised and parsed, and cut to fit.

:func:`dead_letter` is what the dispatcher stages for a record it cannot process; the header
names are the wire contract's, in ``constants``; ``rc-worker dlq`` reads them back with :func:`origin`.

Dead letters too large for their topic are cut to fit, the outbox publisher's last resort.

A dead letter keeps its record's value byte for byte, and ``rc-worker topics create`` sizes
the dead-letter topic for that. One still too large (a topic made some other way, a record
that was compressed on the event topic) would be refused on every try and hold up its
partition's outbox for good. It goes out instead with its value cut to fit and
``rc-dlq-truncated`` giving the value's original size; if the record's own headers alone
leave no room, they are left out too, and ``rc-dlq-headers-dropped`` says how many.
Commands are never cut: a handler's command that large is refused when it is staged.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker import constants
from worker.events import RawRecord
from worker.kafka import Outgoing, record_bytes
from worker.persistence.records import OutboxMessage

# The varint lengths of a record and of its value grow by at most 4 bytes each between an
# empty value and any value Kafka takes; a few more for good measure.
_LENGTH_SLACK = 16


def is_dead_letter(headers: Sequence[tuple[str, bytes]]) -> bool:
    """Whether an outbox record is a dead letter (commands carry no rc-dlq-* headers)."""
    return any(name == constants.DLQ_REASON for name, _ in headers)


def origin(headers: Sequence[tuple[str, bytes]]) -> dict[str, str | int | None]:
    """Where a dead letter's record came from, from its rc-dlq-* headers (the last of each)."""
    found = dict(headers)

    def number(name: str) -> int | None:
        text = found.get(name, b"").decode(errors="replace")
        return int(text) if text.lstrip("-").isdigit() else None

    topic = found.get(constants.DLQ_TOPIC)
    return {
        "topic": topic.decode(errors="replace") if topic is not None else None,
        "partition": number(constants.DLQ_PARTITION),
        "offset": number(constants.DLQ_OFFSET),
    }


def truncate(letter: Outgoing, limit: int) -> Outgoing | None:
    """``letter`` cut to at most ``limit`` bytes, or None if even its rc-* headers alone take more."""
    marker = (constants.DLQ_TRUNCATED, str(len(letter.value)).encode())
    headers = [*letter.headers, marker]
    if record_bytes(letter.key, b"", headers) + _LENGTH_SLACK > limit:
        # The worker's headers come after the record's own (dead_letter() appends them, from
        # the reason on): keep those, which say what this is and where it came from.
        ours = max((i for i, (name, _) in enumerate(letter.headers) if name == constants.DLQ_REASON), default=0)
        dropped = (constants.DLQ_HEADERS_DROPPED, str(ours).encode())
        headers = [*letter.headers[ours:], marker, dropped]
    room = limit - record_bytes(letter.key, b"", headers) - _LENGTH_SLACK
    if room < 0:
        return None
    return letter._replace(value=letter.value[:room], headers=headers)


def dead_letter(
    record: RawRecord, topic: str, reason: str, *, stage: str, app_id: str | None = None, error_type: str | None = None
) -> OutboxMessage:
    """The dead-letter record for ``record``: its key, value and headers kept, the reason added."""
    headers = [
        *record.headers,
        # A reason may quote the refused value (a lone surrogate): escaped, never an error here.
        (constants.DLQ_REASON, reason.encode("utf-8", "backslashreplace")[:2000]),
        (constants.DLQ_STAGE, stage.encode()),
        (constants.DLQ_TOPIC, record.topic.encode()),
        (constants.DLQ_PARTITION, str(record.partition).encode()),
        (constants.DLQ_OFFSET, str(record.offset).encode()),
        (constants.DLQ_TIMESTAMP, str(record.timestamp_ms).encode()),
    ]
    if app_id is not None:
        headers.append((constants.DLQ_APP, app_id.encode()))
    if error_type is not None:
        headers.append((constants.DLQ_ERROR_TYPE, error_type.encode()))
    return OutboxMessage(app_id, topic, record.key, record.value or b"", tuple(headers))
