"""What a run leaves: the app's records, the commands it staged, the dead letters, and how two states differ."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from worker import constants
from worker.apps.contract import Record
from worker.persistence.associations import Association
from worker.persistence.store import Store
from worker.persistence.unit import OutboxMessage, decode_data
from worker.testing.builders import COMMANDS_TOPIC, DEAD_LETTER_TOPIC


@dataclass(frozen=True, slots=True)
class Command:
    """A command the app staged through ``modify``: the CloudEvent bound for the commands topic.

    Attributes:
        id: the command id, ``<event source>/<event id>/<app id>/<n>``: the same on every run.
        type: ``chat.rocket.message.update`` or ``chat.rocket.message.create``.
        subject: the id of the event whose handling staged it.
        key: the Kafka key (the room id).
        data: the command's data, e.g. ``{"messageId": ..., "customFields": {...}, ...}``.
        app_id: the app that staged it.

    """

    id: str
    type: str
    subject: str | None
    key: str | None
    data: dict[str, Any]
    app_id: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record the worker gave up on: not a contract event (stage ``decode``) or the handler kept failing (``handler``)."""

    stage: str
    reason: str
    app_id: str | None
    error_type: str | None
    key: str | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one :meth:`Harness.deliver` call did, summed over its batches."""

    records: int
    processed: int
    duplicates: int
    skipped: int
    dead_lettered: int
    conflicts: int


@dataclass(frozen=True, slots=True)
class State:
    """A snapshot of one app's records and of what its runs staged, comparable with another.

    Attributes:
        app_id: the app.
        records: its records, ordered by id.
        commands: the commands staged by committed runs, oldest first.
        dead_letters: the records given up on, oldest first.

    """

    app_id: str
    records: tuple[Record, ...]
    commands: tuple[Command, ...]
    dead_letters: tuple[DeadLetter, ...]

    def records_with(self, *associations: Association) -> list[Record]:
        """The records having every one of ``associations`` (all records, given none)."""
        wanted = set(associations)
        return [r for r in self.records if wanted.issubset(r.associations)]

    def data(self, *associations: Association) -> list[dict[str, Any]]:
        """The data of the records having every one of ``associations``."""
        return [r.data for r in self.records_with(*associations)]

    def differences(self, got: State, *, ignore_fields: Iterable[str] = ()) -> list[str]:
        """How ``got`` differs from this (expected) state; empty when they are equal.

        Records are compared by their associations and data, not by id or version (ids made
        by ``create`` are random). One line per association set whose records differ, then
        one for commands and one for dead letters, each with what was expected and got.

        Args:
            got: the state to compare with this one.
            ignore_fields: top-level data fields left out of the comparison (e.g. timestamps).

        """
        ignored = frozenset(ignore_fields)
        lines = []
        expected, actual = _by_associations(self.records, ignored), _by_associations(got.records, ignored)
        for associations in sorted(expected.keys() | actual.keys()):
            want, have = sorted(expected.get(associations, [])), sorted(actual.get(associations, []))
            if want != have:
                where = "records with " + ", ".join(associations) if associations else "records without associations"
                lines.append(f"{where}: expected {_show(want, 'record')}; got {_show(have, 'record')}")
        lines += _multiset_difference(
            "commands", [_canonical(_command_json(c)) for c in self.commands], [_canonical(_command_json(c)) for c in got.commands]
        )
        lines += _multiset_difference(
            "dead letters",
            [_canonical(_dead_letter_json(d)) for d in self.dead_letters],
            [_canonical(_dead_letter_json(d)) for d in got.dead_letters],
        )
        return lines


async def _snapshot(store: Store, app_id: str) -> State:
    records = tuple(
        Record(r.id, decode_data(r.data), r.version, tuple(Association.parse(a) for a in r.associations))
        for r in await store.app_records(app_id)
    )
    outbox = [m for _, m in await store.outbox_messages()]
    commands = tuple(_command(m) for m in outbox if m.topic == COMMANDS_TOPIC and m.app_id == app_id)
    dead_letters = tuple(_dead_letter(m) for m in outbox if m.topic == DEAD_LETTER_TOPIC)
    return State(app_id, records, commands, dead_letters)


def _command(message: OutboxMessage) -> Command:
    envelope = orjson.loads(message.value)
    return Command(
        envelope["id"], envelope["type"], envelope.get("subject"), _text(message.key), envelope.get("data") or {}, message.app_id
    )


def _dead_letter(message: OutboxMessage) -> DeadLetter:
    headers = {name: value.decode(errors="replace") for name, value in message.headers}
    return DeadLetter(
        headers.get(constants.DLQ_STAGE, "?"),
        headers.get(constants.DLQ_REASON, ""),
        headers.get(constants.DLQ_APP),
        headers.get(constants.DLQ_ERROR_TYPE),
        _text(message.key),
        message.value,
    )


def _event_id(value: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
        return str(orjson.loads(value).get("id", "?"))
    return "?"


def _text(raw: bytes | None) -> str | None:
    return raw.decode(errors="replace") if raw is not None else None


def _canonical(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _by_associations(records: Iterable[Record], ignored: frozenset[str]) -> dict[tuple[str, ...], list[str]]:
    grouped: dict[tuple[str, ...], list[str]] = {}
    for record in records:
        key = tuple(sorted(str(a) for a in record.associations))
        grouped.setdefault(key, []).append(_canonical({k: v for k, v in record.data.items() if k not in ignored}))
    return grouped


def _command_json(command: Command) -> dict[str, Any]:
    return {"id": command.id, "type": command.type, "key": command.key, "data": command.data}


def _dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    return {"stage": letter.stage, "app": letter.app_id, "reason": letter.reason, "event": _event_id(letter.value)}


def _show(items: Sequence[str], noun: str, limit: int = 3) -> str:
    if not items:
        return f"no {noun}s"
    shown = ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}: {shown}"


def _multiset_difference(what: str, expected: Sequence[str], got: Sequence[str]) -> list[str]:
    missing = list((Counter(expected) - Counter(got)).elements())
    extra = list((Counter(got) - Counter(expected)).elements())
    if not missing and not extra:
        return []
    parts = [f"{what}: expected {len(expected)}, got {len(got)}"]
    if missing:
        parts.append(f"missing {_show(missing, 'item')}")
    if extra:
        parts.append(f"unexpected {_show(extra, 'item')}")
    return ["; ".join(parts)]


def _section(title: str, lines: Sequence[str]) -> str:
    return f"{title}:\n" + "\n".join(f"  - {line}" for line in lines)
