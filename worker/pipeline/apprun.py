"""One run of a batch's events through the apps that take them, inside the batch's unit of work.

Each app runs an event's check_ and execute_ methods for its interface (sent, updated,
deleted), under the handler time limit; its errors are retried with backoff and, when they
persist, the event is dead-lettered for that app. A failure of the database is never the
handler's: it ends the run, and the dispatcher retries or abandons the whole unit. In a unit
shared by several partitions (see ``combine``) a handler that must back off does not wait
there: it raises ``Backoff``, and its partition goes on alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog
from structlog.contextvars import bound_contextvars

from worker import tracing
from worker.apps.contract import App, Read
from worker.apps.http import Http
from worker.apps.modify import Modify
from worker.apps.persistence import PersistenceReader, PersistenceWriter
from worker.apps.readers import Directory
from worker.config import ProcessingSettings
from worker.errors import DecodeError, FencedError, PersistenceError, UnawaitedCallError, VersionConflict
from worker.events import Event, RawRecord
from worker.logs import current_event
from worker.persistence.keys import Marker
from worker.persistence.unit import UnitOfWork
from worker.pipeline.bounded import bounded
from worker.pipeline.dead_letters import dead_letter
from worker.pipeline.hooks import Hooks
from worker.pipeline.retry import backoff
from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.dispatch")

# A batch's records, each with its event or why it is none.
Decoded = Sequence[tuple[RawRecord, Event | DecodeError]]

# Handler run durations go to the hooks at most this often (and at the end of each batch),
# not once per run: counting is per batch, and a long batch still shows progress.
REPORT_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Topics:
    """Where dead letters and commands go."""

    dead_letter: str
    commands: str


@dataclass(slots=True)
class HandlerFailures:
    """Each (app, event)'s failed handler runs so far, across every run of its batch.

    A batch runs again after a conflict (and its locked attempt runs the handlers once
    unlocked first): counting across runs keeps ``processing.handler_max_attempts`` a bound
    on the whole delivery, and keeps a failing handler's backoff out of the locked run.
    """

    runs: Counter[Marker] = field(default_factory=Counter)
    last: dict[Marker, Exception] = field(default_factory=dict)

    def failed(self, marker: Marker, exc: Exception) -> int:
        """Count a failed run; returns how many there have been."""
        self.runs[marker] += 1
        self.last[marker] = exc
        return self.runs[marker]


class Backoff(Exception):
    """A handler failed in a unit shared by several partitions and must wait before its next try.

    ``done``: how many events of its batch went through before it, and ``result`` their tallies.
    """

    def __init__(self, app_id: str) -> None:
        super().__init__(app_id)
        self.part = -1
        self.done = 0
        self.result: BatchResult | None = None


@dataclass(frozen=True, slots=True)
class Surroundings:
    """What every handler run of a dispatcher sees besides its unit: fixed for a batch."""

    http: Http
    topics: Topics
    settings: ProcessingSettings
    hooks: Hooks
    directory: Directory
    own_user_id: str | None  # the loop guard: its messages skip apps that do not opt in


@dataclass(frozen=True, slots=True)
class Pass:
    """Which apps one run of a batch's events runs: all, or one of a locked unit's two passes.

    With ``later`` (the apps that own a hot key; see ``Dispatcher._attempt_hot``), the first
    pass runs the others, counts each event and dead-letters the undecodable; the ``second``
    runs those in ``later``. ``tags``, when given, gets the index of the event that staged
    each outbox record, in order, so that two passes' records can be put in event order.
    """

    later: frozenset[str] | None = None
    second: bool = False
    tags: list[int] | None = None

    def runs(self, takers: list[App]) -> list[App]:
        """Those of an event's ``takers`` this pass runs."""
        return takers if self.later is None else [app for app in takers if (app.id in self.later) == self.second]


class Takers:
    """The enabled apps, and which of them take each event type (asked once per type)."""

    def __init__(self, apps: Sequence[App]) -> None:
        self.apps = list(apps)
        self._taking: dict[str, list[App]] = {}
        self._ranks = {app.id: rank for rank, app in enumerate(self.apps)}

    def of(self, event: Event) -> list[App]:
        """The apps that see ``event``: those taking its type (none for system messages and other types)."""
        if event.interface is None:
            return []
        found = self._taking.get(event.type)
        if found is None:
            found = self._taking[event.type] = [app for app in self.apps if app.takes(event.type)]
        return found

    def markers(self, decoded: Decoded) -> list[Marker]:
        """The processed-event marker of each app that sees each event of ``decoded``."""
        return [(app.id, item.source, item.id) for _, item in decoded if isinstance(item, Event) for app in self.of(item)]

    def rank(self, app_id: str | None) -> int:
        """The app's place among the enabled apps (-1: none, a record's dead letter)."""
        return self._ranks.get(app_id, -1) if app_id is not None else -1


@dataclass(slots=True)
class BatchRun:
    """One run of a batch's events through the apps: its unit, accessors and handler timings.

    Not ``alone`` (in a unit with other partitions' batches), a failure that must back off
    raises Backoff instead of waiting: the others do not wait with it.
    """

    unit: UnitOfWork
    failures: HandlerFailures
    alone: bool
    around: Surroundings
    accessors: dict[str, tuple[PersistenceReader, PersistenceWriter]] = field(default_factory=dict)  # per app, made once per run
    durations: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    reported_at: float = field(default_factory=time.perf_counter)

    async def events(self, decoded: Decoded, takers: Takers, done: set[Marker], result: BatchResult, passing: Pass) -> None:
        """Every event of ``decoded`` through the apps of ``passing`` that take it, in order; tallied in ``result``."""
        unit, apps = self.unit, takers.apps
        # One log context for the batch: each line logged while an event runs gets its offset
        # and id from current_event, set per event instead of binding structlog's per event.
        context = current_event.set(None)
        try:
            tags = passing.tags
            for index, (record, item) in enumerate(decoded):
                staged = len(unit.outbox) if tags is not None else 0
                if isinstance(item, DecodeError):
                    if not passing.second:
                        with bound_contextvars(offset=record.offset):
                            log.warning("record_invalid", reason=item.reason)
                        unit.publish(dead_letter(record, self.around.topics.dead_letter, item.reason, stage="decode"))
                        result.dead_lettered += 1
                elif not (taking := takers.of(item)):
                    if not passing.second:
                        result.skipped += 1
                        result.outcomes.update((app.id, "skipped") for app in apps)
                else:
                    current_event.set((item.record.offset, item.id))
                    with tracing.span("rc_worker.event", offset=item.record.offset, event_id=item.id):
                        outcomes = await self.event(passing.runs(taking), item, done, index, result)
                    # Only once the event went through: one that backs off is counted by its next run.
                    if len(taking) < len(apps) and not passing.second:
                        result.outcomes.update((app.id, "skipped") for app in apps if app not in taking)
                    _tally(result, outcomes, event=not passing.second)
                if tags is not None:
                    tags.extend([index] * (len(unit.outbox) - staged))
        finally:
            current_event.reset(context)
            self.report()

    async def event(self, takers: Sequence[App], event: Event, done: set[Marker], index: int, result: BatchResult) -> list[tuple[str, str]]:
        """Every app in ``takers`` on one event; returns (app id, outcome) of each.

        In a shared unit, a handler that must back off undoes the event's other apps and
        ends the batch's part there (see Backoff), with what went through before it.
        """
        checkpoint = None if self.alone else self.unit.checkpoint()
        outcomes: list[tuple[str, str]] = []
        added: list[Marker] = []
        for app in takers:
            marker = (app.id, event.source, event.id)
            if marker in done:
                outcomes.append((app.id, "duplicate"))
                continue
            try:
                outcomes.append((app.id, await self.app(app, event, marker)))
            except Backoff as exc:
                if checkpoint is not None:
                    self.unit.rollback_to(checkpoint)
                done.difference_update(added)
                exc.done, exc.result = index, result
                raise
            done.add(marker)
            added.append(marker)
        return outcomes

    async def app(self, app: App, event: Event, marker: Marker) -> str:
        """One app on one event: retried on its errors, dead-lettered when they persist; returns which."""
        unit, failures, settings = self.unit, self.failures, self.around.settings
        checkpoint = unit.checkpoint()
        message = event.message
        if message is not None and message.sender.id == self.around.own_user_id and not app.handles_own_messages:
            unit.mark_processed(marker)
            return "skipped"
        while failures.runs[marker] < settings.handler_max_attempts:
            started = time.perf_counter()
            try:
                with tracing.span("rc_worker.handler", app=app.id):
                    await self._invoke(app, event)
                if unit.failure is not None:
                    raise unit.failure
                _check_awaited(unit, app.id)
                unit.mark_processed(marker)
                self.ran(app.id, "ok", started)
                return "processed"
            except (VersionConflict, FencedError, PersistenceError):
                raise  # not the handler's doing: the whole batch is retried or abandoned
            except Exception as exc:
                self.ran(app.id, "error", started)
                if unit.failure is not None:
                    # The handler failed because the database did (perhaps wrapped in its own
                    # error): the batch is retried or abandoned, never this event dead-lettered.
                    raise unit.failure from exc
                unit.rollback_to(checkpoint)
                attempt = failures.failed(marker, exc)
                retriable = isinstance(exc, TimeoutError) or getattr(exc, "retriable", True)
                retrying = retriable and attempt < settings.handler_max_attempts
                self.around.hooks.handler_failed(app.id, exc, attempt, retrying)
                if not retrying:
                    break
                elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
                log.info(
                    "handler_retry", app=app.id, attempt=attempt, error_type=type(exc).__name__, error=str(exc), duration_ms=elapsed_ms
                )
                if not self.alone:
                    raise Backoff(app.id) from exc
                await asyncio.sleep(backoff(attempt, settings))
        return self._dead_letter(app, event, marker)

    async def _invoke(self, app: App, event: Event) -> None:
        """One run of ``app``'s check_ and execute_ methods for the event's interface."""
        message = event.message
        if message is None:  # the dispatcher passes message events only
            raise TypeError("only message events reach apps")
        found = self.accessors.get(app.id)
        if found is None:
            found = self.accessors[app.id] = (PersistenceReader(self.unit, app.id), PersistenceWriter(self.unit, app.id))
        reader, persistence = found
        around = self.around
        read, http, limit = (
            Read(reader, app.settings, around.directory.for_message(message)),
            around.http,
            around.settings.handler_timeout_s,
        )
        modify = Modify(self.unit, app.id, event, around.topics.commands)
        interface = event.interface
        if interface == "post_message_deleted":
            context = event.delete_context()
            if await bounded(app.check_post_message_deleted(message, read, http, context), limit):
                await bounded(app.execute_post_message_deleted(message, read, http, persistence, modify, context), limit)
        elif interface == "post_message_updated":
            if await bounded(app.check_post_message_updated(message, read, http), limit):
                await bounded(app.execute_post_message_updated(message, read, http, persistence, modify), limit)
        elif await bounded(app.check_post_message_sent(message, read, http), limit):
            await bounded(app.execute_post_message_sent(message, read, http, persistence, modify), limit)

    def _dead_letter(self, app: App, event: Event, marker: Marker) -> str:
        # Out of attempts, in this run or an earlier run of the batch: the last error decides.
        failures = self.failures
        error, attempts = failures.last[marker], failures.runs[marker]
        failures.runs[marker] = self.around.settings.handler_max_attempts  # a non-retriable error ends it in every run
        log.error("handler_dead_lettered", app=app.id, attempts=attempts, error_type=type(error).__name__, error=str(error))
        self.unit.publish(
            dead_letter(
                event.record,
                self.around.topics.dead_letter,
                f"{type(error).__name__}: {error}",
                stage="handler",
                app_id=app.id,
                error_type=type(error).__name__,
            )
        )
        # Not marked processed: its state never changed, so a redrive of this event (or a
        # later redelivery) must be able to process it.
        return "dead_lettered"

    def ran(self, app_id: str, outcome: str, started: float) -> None:
        """Note one handler run that began at ``started`` (perf_counter) and ended now."""
        now = time.perf_counter()
        found = self.durations.get((app_id, outcome))
        if found is None:
            found = self.durations[(app_id, outcome)] = []
        found.append(now - started)
        if now - self.reported_at >= REPORT_EVERY_S:
            self.report()

    def report(self) -> None:
        """Hand the durations noted so far to the hooks."""
        for (app_id, outcome), seconds in self.durations.items():
            self.around.hooks.handler_runs(app_id, outcome, seconds)
        self.durations = {}
        self.reported_at = time.perf_counter()


def _tally(result: BatchResult, outcomes: Sequence[tuple[str, str]], *, event: bool) -> None:
    for app_id, outcome in outcomes:
        result.outcomes[app_id, outcome] += 1
        if outcome == "duplicate":
            result.duplicates += 1
        else:
            result.per_app[app_id] = result.per_app.get(app_id, 0) + 1
    if event:  # not the second pass's runs of an event the first pass counted
        result.processed += 1


def _check_awaited(unit: UnitOfWork, app_id: str) -> None:
    missed = unit.take_unawaited()
    if missed:
        raise UnawaitedCallError(
            f"app {app_id!r} called {'; '.join(missed)} and never awaited it, so it did nothing; add `await` before the call"
        )


__all__ = ["Backoff", "BatchRun", "Decoded", "HandlerFailures", "Pass", "Surroundings", "Takers", "Topics"]
