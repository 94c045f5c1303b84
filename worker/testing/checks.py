"""The checks that catch what only shows in a cluster: idempotence under repeated runs, and safety under concurrent copies.

- :func:`assert_idempotent`: every event delivered twice, and every handler run repeated as
  after a version conflict, must leave the state that a single run leaves.
- :func:`assert_concurrency_safe`: several copies of the app processing the events at once,
  over one database, must leave the state that one copy processing them in order leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from worker.apps.contract import App
from worker.testing.builders import Events, _items
from worker.testing.harness import _AppSpec, _concurrent_scenario, _scenario
from worker.testing.state import _section
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


async def assert_idempotent(
    app: type[App] | str,
    events: Events,
    *,
    settings: Mapping[str, Any] | None = None,
    app_id: str | None = None,
    ignore_fields: Iterable[str] = (),
) -> None:
    """Check that redelivered events and repeated runs change nothing.

    Runs three throwaway databases: the events delivered once; every event delivered twice
    (the same CloudEvent again, as after a rebalance or a publisher's retry); and every
    handler run repeated, its first run's writes rolled back (its first commit is refused as a
    concurrent worker's change would make it, so the real dispatcher runs it again). The
    second and third must leave the records, commands and dead letters of the first.

    Args:
        app: the App subclass or an installed app id.
        events: as for :meth:`Harness.deliver`.
        settings: the app's settings.
        app_id: the id to run it under.
        ignore_fields: top-level record fields to leave out of the comparison.

    Raises:
        AssertionError: a state differs; the message names the scenario, each association
            whose records differ with what was expected and got, and why it matters.

    """
    spec = _AppSpec.resolve(app, app_id, settings or {})
    items = _items(events)
    once = await _scenario(spec, [items])
    problems = []
    twice = await _scenario(spec, [items, items])
    if diff := once.differences(twice, ignore_fields=ignore_fields):
        problems.append(_section("Delivering every event twice (the same CloudEvent again) changed the state", diff))
    repeated = await _scenario(spec, [items], repeat_runs=True)
    if diff := once.differences(repeated, ignore_fields=ignore_fields):
        problems.append(
            _section("Running every handler run again, as after a version conflict (its first run rolled back), changed the state", diff)
        )
    if problems:
        raise AssertionError(f"{spec.describe()} is not idempotent.\n" + "\n".join(problems) + "\n" + _IDEMPOTENT_WHY)


async def assert_concurrency_safe(
    app: type[App] | str,
    events: Events,
    *,
    copies: int = 4,
    settings: Mapping[str, Any] | None = None,
    app_id: str | None = None,
    ignore_fields: Iterable[str] = (),
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

    Raises:
        ValueError: fewer than 2 copies, or the events are all of one room, so nothing
            would run concurrently.
        AssertionError: the states differ; the message names each association whose
            records differ, with what was expected and got.

    """
    if copies < 2:
        raise ValueError("copies must be at least 2 for anything to run concurrently")
    spec = _AppSpec.resolve(app, app_id, settings or {})
    items = _items(events)
    lanes = _spread(items, copies)
    if sum(1 for lane in lanes if lane) < 2:
        raise ValueError(
            "all events have one record key (room), so they would all go to one copy, in order, as to one Kafka "
            "partition: nothing would run concurrently. Give events in at least 2 rooms."
        )
    serial = await _scenario(spec, [items])
    concurrent = await _concurrent_scenario(spec, lanes)
    if diff := serial.differences(concurrent, ignore_fields=ignore_fields):
        section = _section(
            f"{copies} copies processing the events at once left a state that one copy processing them in order does not", diff
        )
        raise AssertionError(f"{spec.describe()} is not concurrency-safe.\n{section}\n{_CONCURRENT_WHY}")


def _spread(items: Sequence[FileRecord], copies: int) -> list[list[FileRecord]]:
    """Events of one key to one copy, in order; keys dealt round-robin in order of first appearance."""
    lanes: list[list[FileRecord]] = [[] for _ in range(copies)]
    assigned: dict[bytes | None, int] = {}
    for item in items:
        lane = assigned.setdefault(item.key, len(assigned) % copies)
        lanes[lane].append(item)
    return lanes
