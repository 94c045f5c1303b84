"""What a run leaves: the app's records, the commands it staged, the dead letters, and how two states differ."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from worker import constants
from worker.apps.accessors import Record
from worker.persistence.associations import Association
from worker.persistence.records import OutboxMessage
from worker.persistence.store import Store
from worker.persistence.values import decode_data
from worker.testing.builders import COMMANDS_TOPIC, DEAD_LETTER_TOPIC


@dataclass(frozen=True, slots=True)
class Command:
    """A command the app staged through ``modify``: the CloudEvent bound for the commands topic.

    Attributes:
        id: the command id, ``<event source>/<event id>/<app id>/<n>``: the same on every run.
        type: ``chat.rocket.message.update``, ``.create``, ``.delete``, ``chat.rocket.user.notify`` or
            ``chat.rocket.room.notify``.
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
    """A record the worker gave up on: not a contract event (stage ``decode``), the handler kept failing (``handler``), or the database refused a value (``commit``)."""

    stage: str
    reason: str
    app_id: str | None
    error_type: str | None
    key: str | None
    value: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    """What one :meth:`Harness.deliver` call did, summed over its batches.

    Each record counts once: ``processed`` (the app's run committed), ``duplicates``,
    ``skipped`` (not a PostMessageSent event) or ``dead_lettered`` (not a contract event,
    the handler kept failing, or the database refused what it staged).
    """

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

    def failures(self) -> list[DeadLetter]:
        """The events the handler failed on: dead-lettered by its errors or endless conflicts, not by ``DeadLetterNow``."""
        return [d for d in self.dead_letters if d.stage != "decode" and d.error_type != "DeadLetterNow"]

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
                line = f"{where}: expected {_show(want, 'record')}; got {_show(have, 'record')}"
                if len(want) == len(have) == 1:  # one record each: say where they differ
                    line += "; differs at " + "; ".join(_focus(orjson.loads(want[0]), orjson.loads(have[0])))
                lines.append(line)
        lines += _command_differences(self.commands, got.commands)
        lines += _multiset_difference(
            "dead letters",
            [_canonical(_dead_letter_json(d)) for d in self.dead_letters],
            [_canonical(_dead_letter_json(d)) for d in got.dead_letters],
        )
        return lines


async def snapshot(store: Store, app_id: str) -> State:
    """What ``store`` holds of ``app_id``: records, staged commands and dead letters."""
    records = tuple(
        Record(r.id, decode_data(r.data), r.version, tuple(Association.parse(a) for a in r.associations))
        for r in await store.app_records(app_id)
    )
    outbox = [m for _, m in await store.outbox_messages()]
    commands = tuple(_command(m) for m in outbox if m.topic == COMMANDS_TOPIC and m.app_id == app_id)
    dead_letters = tuple(dead_letter_of(m) for m in outbox if m.topic == DEAD_LETTER_TOPIC)
    return State(app_id, records, commands, dead_letters)


def _command(message: OutboxMessage) -> Command:
    envelope = orjson.loads(message.value)
    return Command(
        envelope["id"], envelope["type"], envelope.get("subject"), _text(message.key), envelope.get("data") or {}, message.app_id
    )


def dead_letter_of(message: OutboxMessage) -> DeadLetter:
    """A staged dead letter as the kit shows it."""
    headers = {name: value.decode(errors="replace") for name, value in message.headers}
    return DeadLetter(
        headers.get(constants.DLQ_STAGE, "?"),
        headers.get(constants.DLQ_REASON, ""),
        headers.get(constants.DLQ_APP),
        headers.get(constants.DLQ_ERROR_TYPE),
        _text(message.key),
        message.value,
    )


def event_id_of(value: bytes) -> str:
    """The CloudEvent id in a record value, or "?"."""
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
    return {"stage": letter.stage, "app": letter.app_id, "reason": letter.reason, "event": event_id_of(letter.value)}


def _show(items: Sequence[str], noun: str, limit: int = 3, width: int = 160) -> str:
    if not items:
        return f"no {noun}s"
    shown = ", ".join(item if len(item) <= width else item[: width - 3] + "..." for item in items[:limit]) + (
        f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    )
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}: {shown}"


def _multiset_difference(what: str, expected: Sequence[str], got: Sequence[str]) -> list[str]:
    parts = _missing_and_extra(expected, got)
    return ["; ".join([f"{what}: expected {len(expected)}, got {len(got)}", *parts])] if parts else []


def _missing_and_extra(expected: Sequence[str], got: Sequence[str]) -> list[str]:
    missing = list((Counter(expected) - Counter(got)).elements())
    extra = list((Counter(got) - Counter(expected)).elements())
    parts = []
    if missing:
        parts.append(f"missing {_show(missing, 'item')}")
    if extra:
        parts.append(f"unexpected {_show(extra, 'item')}")
    return parts


def _command_differences(expected: Sequence[Command], got: Sequence[Command]) -> list[str]:
    """How the commands differ: those staged on one side only in full, those staged on both (by id) where they differ."""
    mine, theirs = [_command_json(c) for c in expected], [_command_json(c) for c in got]
    if Counter(map(_canonical, mine)) == Counter(map(_canonical, theirs)):
        return []
    by_id = {c["id"]: c for c in theirs}
    changed = [(c, by_id[c["id"]]) for c in mine if c["id"] in by_id and by_id[c["id"]] != c]
    paired = {c["id"] for c, _ in changed}
    parts = [f"commands: expected {len(mine)}, got {len(theirs)}"]
    parts += _missing_and_extra(
        [_canonical(c) for c in mine if c["id"] not in paired], [_canonical(c) for c in theirs if c["id"] not in paired]
    )
    return ["; ".join(parts)] + [f"command {a['id']}: " + "; ".join(_focus(a, b)) for a, b in changed]


def _focus(expected: Any, got: Any, where: str = "") -> list[str]:
    """Where two JSON values differ: one ``path: expected ...; got ...`` per differing leaf."""
    if isinstance(expected, dict) and isinstance(got, dict):
        lines: list[str] = []
        for key in sorted(expected.keys() | got.keys()):
            path = f"{where}.{key}" if where else str(key)
            if key not in got:
                lines.append(f"{path}: expected {_brief(expected[key])}; got nothing")
            elif key not in expected:
                lines.append(f"{path}: expected nothing; got {_brief(got[key])}")
            else:
                lines += _focus(expected[key], got[key], path)
        return lines
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        return [line for n, (a, b) in enumerate(zip(expected, got, strict=True)) for line in _focus(a, b, f"{where}[{n}]")]
    return [] if expected == got else [f"{where or 'value'}: expected {_brief(expected)}; got {_brief(got)}"]


def _brief(value: Any, limit: int = 80) -> str:
    text = repr(value) if isinstance(value, str) else _canonical(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_section(title: str, lines: Sequence[str]) -> str:
    """A titled list for an assertion message."""
    return f"{title}:\n" + "\n".join(f"  - {line}" for line in lines)
