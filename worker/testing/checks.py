"""The checks that catch what only shows in a cluster: idempotence under repeated runs, and safety under concurrent copies.

- :func:`assert_idempotent`: every handler run repeated as after a version conflict must
  leave the effects that a single run leaves; the http calls it repeats are reported.
- :func:`assert_concurrency_safe`: several copies of the app processing the events at once,
  over one database, must leave the state that one copy processing them in order leaves.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.apps.contract import App
from worker.rocketchat.stub import RocketChatStub
from worker.testing.builders import Events, file_records
from worker.testing.harness import AppSpec, app_user_of, run_concurrently, run_scenario
from worker.testing.state import State, event_id_of, format_section
from worker.tools.dump import FileRecord

_IDEMPOTENT_WHY = (
    "Why it matters: the worker repeats a handler run after a version conflict, an error or a crash, and each repeat "
    "must reach the same state from the same stored data. Keep no state in memory (attributes, globals), do not "
    "derive stored data from http calls that count or change something, and write with update(..., upsert=True) / "
    "update_by_association rather than create() for data that must exist once."
)


_CONCURRENT_WHY = (
    "Why it matters: several workers run the app at once, each with its own instance; the version checks make "
    "everything the app keeps in persistence safe, but nothing else. Keep no state in memory (attributes, globals, "
    "caches) and keep every count in records."
)


@dataclass(frozen=True, slots=True)
class IdempotencyReport:
    """What :func:`assert_idempotent` saw besides the state, returned when it passes.

    Attributes:
        repeated_http: the http calls that change something (POST, PUT, PATCH, DELETE) which
            a repeated run made again, one line each: ``"POST <url>: 2 calls in one run of
            each event, 4 when each run is repeated"``. Reads (GET, HEAD, OPTIONS) are left
            out: repeating them is expected. ``strict=True`` makes any of these a failure.

    """

    repeated_http: list[str] = field(default_factory=list)


async def assert_idempotent(
    app: type[App] | str,
    events: Events,
    *,
    settings: Mapping[str, Any] | None = None,
    app_id: str | None = None,
    ignore_fields: Iterable[str] = (),
    strict: bool = False,
    rocketchat: RocketChatStub | None = None,
    app_user_id: str | None = None,
    app_username: str | None = None,
) -> IdempotencyReport:
    """Check that repeated handler runs change nothing, and report the http calls they repeat.

    Runs two throwaway databases: the events delivered once; and every handler run
    repeated, its first run's writes rolled back (its first commit is refused as a
    concurrent worker's change would make it, so the real dispatcher runs it again). The
    second must leave every effect the kit sees as the first did: the records, the commands
    staged through ``modify`` and the dead letters.

    An event delivered twice (the same CloudEvent again) is not checked: the processed
    marker, committed in the one transaction with the run's effects, makes a redelivery
    change nothing for any handler, so such a check could never fail.

    Args:
        app: the App subclass or an installed app id.
        events: as for :meth:`Harness.deliver`.
        settings: the app's settings.
        app_id: the id to run it under.
        ignore_fields: top-level record fields to leave out of the comparison.
        strict: fail when a repeated run repeats an http call that changes something
            (POST, PUT, PATCH, DELETE), even if the state is the same.
        rocketchat: a stub answering the readers' REST calls (see :class:`Harness`).
        app_user_id: the app user's id (see :class:`Harness`).
        app_username: the app user's username.

    Returns:
        What the check saw: the http calls a repeated run repeated.

    Raises:
        AssertionError: the handler failed on an event (other than by ``DeadLetterNow``),
            which would make the comparison meaningless; or an effect differs: the message
            names it (each association whose records differ, each command, each dead
            letter) with what was expected and got, and why it matters; or, with
            ``strict``, an http call was repeated.

    """
    spec = AppSpec.resolve(app, app_id, settings or {}, rocketchat, app_user_of(app_user_id, app_username, rocketchat))
    items = file_records(events)
    once = await run_scenario(spec, [items])
    _require_no_failures(spec, once.state, len(items))
    repeated = await run_scenario(spec, [items], repeat_runs=True)
    problems = []
    if diff := once.state.differences(repeated.state, ignore_fields=ignore_fields):
        problems.append(
            format_section(
                "Running every handler run again, as after a version conflict (its first run rolled back), changed the state", diff
            )
        )
    report = IdempotencyReport(_repeated_changes(once.http_calls, repeated.http_calls))
    if report.repeated_http and (strict or problems):
        title = "http calls a repeated run made again" + (" (strict=True makes this a failure)" if strict else "")
        problems.append(format_section(title, report.repeated_http))
    if problems:
        raise AssertionError(f"{spec.describe()} is not idempotent.\n" + "\n".join(problems) + "\n" + _IDEMPOTENT_WHY)
    return report


async def assert_concurrency_safe(
    app: type[App] | str,
    events: Events,
    *,
    copies: int = 4,
    settings: Mapping[str, Any] | None = None,
    app_id: str | None = None,
    ignore_fields: Iterable[str] = (),
    rocketchat: RocketChatStub | None = None,
    app_user_id: str | None = None,
    app_username: str | None = None,
) -> None:
    """Check that ``copies`` instances running at once leave the state one instance leaves.

    The events are spread over the copies as Kafka spreads them over partitions: all events
    of one room (one record key) go to one copy, in order. Each copy has its own app
    instance, dispatcher and database connections, as a separate worker process would, and
    all of them run at once over one SQLite database. The result must equal one copy
    processing every event in order.

    Args:
        app: the App subclass or an installed app id.
        events: as for :meth:`Harness.deliver`; use at least two rooms.
        copies: how many copies run at once (at least 2).
        settings: the app's settings.
        app_id: the id to run it under.
        ignore_fields: top-level record fields to leave out of the comparison.
        rocketchat: a stub answering the readers' REST calls (see :class:`Harness`).
        app_user_id: the app user's id (see :class:`Harness`).
        app_username: the app user's username.

    Raises:
        ValueError: fewer than 2 copies, or the events are all of one room, so nothing
            would run concurrently.
        AssertionError: the handler failed on an event (other than by ``DeadLetterNow``),
            which would make the comparison meaningless; or the states differ: the message
            names each effect that differs, with what was expected and got.

    """
    if copies < 2:
        raise ValueError("copies must be at least 2 for anything to run concurrently")
    spec = AppSpec.resolve(app, app_id, settings or {}, rocketchat, app_user_of(app_user_id, app_username, rocketchat))
    items = file_records(events)
    lanes = _spread(items, copies)
    if sum(1 for lane in lanes if lane) < 2:
        raise ValueError(
            "all events have one record key (room), so they would all go to one copy, in order, as to one Kafka "
            "partition: nothing would run concurrently. Give events in at least 2 rooms."
        )
    serial = (await run_scenario(spec, [items])).state
    _require_no_failures(spec, serial, len(items))
    concurrent = await run_concurrently(spec, lanes)
    if diff := serial.differences(concurrent, ignore_fields=ignore_fields):
        section = format_section(
            f"{copies} copies processing the events at once left a state that one copy processing them in order does not", diff
        )
        raise AssertionError(f"{spec.describe()} is not concurrency-safe.\n{section}\n{_CONCURRENT_WHY}")


_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _require_no_failures(spec: AppSpec, state: State, events: int) -> None:
    """Fail when the handler failed on events: equal states of dead letters alone prove nothing."""
    failures = state.failures()
    if failures:
        shown = "\n".join(f"  - {event_id_of(d.value)}: {d.reason}" for d in failures[:5])
        more = f"\n  ... ({len(failures) - 5} more)" if len(failures) > 5 else ""
        raise AssertionError(
            f"{spec.describe()} failed on {len(failures)} of {events} events (dead-lettered after its retries), so the "
            f"check cannot tell anything about them:\n{shown}{more}\nFix the handler, or raise DeadLetterNow for events it "
            "must refuse (those are compared like any other effect)."
        )


def _repeated_changes(once: Counter[str], repeated: Counter[str]) -> list[str]:
    return [
        f"{call}: {once[call]} calls in one run of each event, {count} when each run is repeated"
        for call, count in sorted(repeated.items())
        if count > once[call] and not call.startswith(_SAFE_METHODS)
    ]


def _spread(items: Sequence[FileRecord], copies: int) -> list[list[FileRecord]]:
    """Events of one key to one copy, in order; keys dealt round-robin in order of first appearance."""
    lanes: list[list[FileRecord]] = [[] for _ in range(copies)]
    assigned: dict[bytes | None, int] = {}
    for item in items:
        lane = assigned.setdefault(item.key, len(assigned) % copies)
        lanes[lane].append(item)
    return lanes
