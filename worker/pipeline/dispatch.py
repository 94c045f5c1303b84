"""Run the enabled apps over one partition's batch of records, as one unit of work.

Records are decoded, invalid ones staged as dead letters, other event types skipped, and
every PostMessageSent event run through each enabled app in order, unless that app has
already processed it (a redelivery or a publisher's retry). The unit then commits with the
partition's next offset; on a version conflict the whole batch runs again on fresh data.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog
from structlog.contextvars import bound_contextvars

from worker import tracing
from worker.apps.contract import App, Read
from worker.apps.http import Http
from worker.apps.modify import Modify
from worker.apps.persistence import PersistenceReader, PersistenceWriter
from worker.config import ProcessingSettings
from worker.errors import DecodeError, FencedError, PersistenceError, VersionConflict, WorkerError
from worker.events import Event, RawRecord, decode
from worker.logs import current_event
from worker.persistence.keys import Key, Marker
from worker.persistence.store import Fence, Store
from worker.persistence.unit import Snapshot, UnitOfWork
from worker.pipeline.bounded import bounded
from worker.pipeline.dead_letters import dead_letter
from worker.pipeline.hooks import Hooks, contained
from worker.pipeline.retry import backoff
from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.dispatch")
_R = TypeVar("_R")


class ConflictsExhausted(WorkerError):
    """Raised when a batch still conflicts after ``processing.conflict_max_attempts`` runs."""

    retriable = True


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


@dataclass(slots=True)
class Part:
    """One partition's batch in a unit of work that spans several partitions."""

    records: Sequence[RawRecord]
    fence: Fence | None
    decoded: list[tuple[RawRecord, Event | DecodeError]] = field(init=False)
    failures: HandlerFailures = field(default_factory=HandlerFailures)
    # How many of the records the unit processed: fewer than all when an event's handler
    # must back off, so the events before it commit now and the rest runs on its own.
    upto: int = field(init=False)

    def __post_init__(self) -> None:
        self.decoded = [(record, _decode(record)) for record in self.records]
        self.upto = len(self.records)

    @property
    def next_offset(self) -> int:
        """The offset after the last record the unit processed."""
        return self.records[self.upto - 1].offset + 1 if self.upto else self.records[0].offset

    @property
    def rest(self) -> Sequence[RawRecord]:
        """The records left to run on their own."""
        return self.records[self.upto :]


class _Backoff(Exception):
    """A handler failed in a unit shared by several partitions and must wait before its next try.

    ``done``: how many events of its batch went through before it, and ``result`` their tallies.
    """

    def __init__(self, app_id: str) -> None:
        super().__init__(app_id)
        self.part = -1
        self.done = 0
        self.result: BatchResult | None = None


# What a commit advances: the first partition's fence and next offset, then the others'.
_Advances = tuple[Fence | None, int | None, list[tuple[Fence, int]]]


def _advances(parts: Sequence[Part]) -> _Advances:
    first, *rest = parts
    return first.fence, first.next_offset, [(p.fence, p.next_offset) for p in rest if p.fence is not None]


@dataclass(frozen=True, slots=True)
class Topics:
    """Where dead letters and commands go."""

    dead_letter: str
    commands: str


class Dispatcher:
    """Turns a batch of records into one committed unit of work."""

    def __init__(
        self,
        apps: Sequence[App],
        store: Store,
        http: Http,
        topics: Topics,
        settings: ProcessingSettings,
        hooks: Hooks | None = None,
        *,
        own_user_id: str | None = None,
    ) -> None:
        self.apps = list(apps)
        self.hooks = contained(hooks)
        # The loop guard: messages this user sent (the app's own) skip apps that do not opt in.
        self.own_user_id = own_user_id
        self.store = store
        self.http = http
        self.topics = topics
        self.settings = settings

    async def dispatch(
        self,
        records: Sequence[RawRecord],
        fence: Fence | None,
        *,
        locked: bool = False,
        snapshot: Snapshot | None = None,
        failures: HandlerFailures | None = None,
    ) -> BatchResult:
        """Process ``records`` (one partition, in offset order) and commit them with the next offset.

        The first attempt is optimistic unless ``locked``; every attempt after a conflict
        runs locked (see ``Store.session``). A batch that still conflicts is split into its
        events, and an event that still conflicts alone is dead-lettered as such. Reads are
        served from ``snapshot`` where it has them, and the commit is folded back into it.

        Raises:
            FencedError: the partition was taken over; nothing was committed.
            PersistenceError: the database failed; nothing was committed.

        """
        decoded = [(record, _decode(record)) for record in records]
        try:
            return await self._attempts(decoded, fence, locked, snapshot or Snapshot(), failures or HandlerFailures())
        except ConflictsExhausted as exc:
            if len(records) == 1:
                return await self._dead_letter_conflicted(records[0], fence, exc)
            log.warning("batch_split", records=len(records), reason=str(exc))
            merged = BatchResult(records[-1].offset + 1)
            for record in records:
                merged.add(await self.dispatch([record], fence, locked=True, snapshot=snapshot))
            return merged

    async def _attempts(
        self,
        decoded: Sequence[tuple[RawRecord, Event | DecodeError]],
        fence: Fence | None,
        locked: bool,
        snapshot: Snapshot,
        failures: HandlerFailures,
    ) -> BatchResult:
        next_offset = decoded[-1][0].offset + 1
        for attempt in range(1, self.settings.conflict_max_attempts + 1):
            hold = locked or attempt > 1
            try:
                result, unit = await self._attempt(
                    lambda unit: self._run(unit, decoded, next_offset, failures), snapshot, hold, lambda: (fence, next_offset, [])
                )
            except VersionConflict as exc:
                await self._conflicted(exc, snapshot, attempt, len(decoded), hold)
                continue
            result.conflicts = attempt - 1
            result.locked = hold
            result.staged_outbox = len(unit.outbox)
            return result
        raise ConflictsExhausted(
            f"batch of {len(decoded)} records ending at offset {next_offset - 1} conflicted "
            f"{self.settings.conflict_max_attempts} times; raise processing.conflict_max_attempts or reduce contention"
        )

    async def _conflicted(self, exc: VersionConflict, snapshot: Snapshot, attempt: int, records: int, locked: bool) -> None:
        self.hooks.conflict(exc)
        if exc.keys is None:
            snapshot.clear()
        else:
            snapshot.forget(exc.keys)
        log.info("batch_conflict", attempt=attempt, records=records, locked=locked, reason=str(exc))
        await asyncio.sleep(backoff(attempt, self.settings))

    async def _attempt(
        self,
        run: Callable[[UnitOfWork], Awaitable[_R]],
        snapshot: Snapshot,
        locked: bool,
        advances: Callable[[], _Advances],
        hot: Collection[Key] = (),
    ) -> tuple[_R, UnitOfWork]:
        """Run ``run`` in a fresh unit and commit it with the offsets ``advances`` gives after the run.

        Optimistic, or ``locked`` (see below); locked with ``hot`` keys, those are locked first.
        """
        if locked and hot:
            return await self._attempt_hot(run, snapshot, advances, hot)
        unit = UnitOfWork(self.store, snapshot)
        result = await run(unit)
        if not locked:
            with self.hooks.commit():
                new_versions = await self.store.commit(unit, *advances())
        else:
            # The handlers ran first without locks, so their work and most of their reads do
            # not hold anyone up; now what they read and wrote is locked, in one statement.
            # Only if some of it changed meanwhile do they run again, inside the locks,
            # re-reading just that: the commit can then no longer conflict on it.
            async with self.store.session() as session:
                if not await session.revalidate(unit, snapshot):
                    unit = UnitOfWork(session, snapshot)
                    result = await run(unit)
                with self.hooks.commit():
                    new_versions = await session.commit(unit, *advances())
        snapshot.absorb(unit, new_versions)  # only once the transaction has committed
        return result, unit

    async def _attempt_hot(
        self, run: Callable[[UnitOfWork], Awaitable[_R]], snapshot: Snapshot, advances: Callable[[], _Advances], hot: Collection[Key]
    ) -> tuple[_R, UnitOfWork]:
        # Keys that other workers keep changing (an app-global counter) are locked before the
        # run, in one statement in key order: the handlers then run once, never again because
        # a hot key changed under them. Lockers of the same hot keys queue on them, so the
        # keys each takes later cannot deadlock with another's.
        async with self.store.session() as session:
            current = await session.lock(sorted(hot))
            snapshot.forget([key for key in hot if snapshot.versions.get(key) != current[key]])
            unit = UnitOfWork(session, snapshot)
            result = await run(unit)
            with self.hooks.commit():
                new_versions = await session.commit(unit, *advances())
        snapshot.absorb(unit, new_versions)
        return result, unit

    # -- several partitions' batches as one unit of work ----------------------------------

    async def dispatch_together(self, parts: Sequence[Part], snapshot: Snapshot, hot: set[Key] | None = None) -> dict[int, BatchResult]:
        """Process several partitions' batches (each in offset order) as one unit and one commit.

        The worker's partitions then never conflict with each other on a key they share (an
        app-global counter): their batches take turns in one unit, reading each other's
        writes. Conflicts with other workers run the unit again, locked after the first; the
        keys they conflicted on join ``hot``, which (kept by the caller from unit to unit) are
        locked before the handlers run, so that they run once. Returns each committed part's result by its index in ``parts``; a part left out
        failed a handler that must back off before its next try, and must be dispatched on
        its own (with its ``failures``), so that its wait holds up no other partition.

        Raises:
            FencedError, PersistenceError, ConflictsExhausted: nothing was committed; dispatch
                each part on its own, which tells them apart.

        """
        remaining = list(range(len(parts)))
        conflicts = 0
        hot = set() if hot is None else hot
        while remaining:
            hold = conflicts > 0 or bool(hot)
            try:
                results, _ = await self._attempt(
                    lambda unit: self._run_parts(unit, parts, remaining),
                    snapshot,
                    hold,
                    lambda: _advances([parts[i] for i in remaining]),
                    hot,
                )
            except _Backoff as exc:
                remaining.remove(exc.part)
                continue
            except VersionConflict as exc:
                conflicts += 1
                hot.update(exc.keys or ())
                if conflicts >= self.settings.conflict_max_attempts:
                    raise ConflictsExhausted(f"{len(remaining)} partitions' batches conflicted {conflicts} times together") from exc
                await self._conflicted(exc, snapshot, conflicts, sum(len(parts[i].decoded) for i in remaining), hold)
                continue
            for result in results.values():
                result.conflicts, result.locked = conflicts, hold
            return results
        return {}

    async def _run_parts(self, unit: UnitOfWork, parts: Sequence[Part], indexes: Sequence[int]) -> dict[int, BatchResult]:
        done = await unit.already_processed([marker for i in indexes for marker in self._markers(parts[i].decoded)])
        results: dict[int, BatchResult] = {}
        for index in indexes:
            part = parts[index]
            part.upto = len(part.records)
            before = len(unit.outbox)
            try:
                results[index] = await self._run(unit, part.decoded, part.next_offset, part.failures, done=done, alone=False)
            except _Backoff as exc:
                if exc.result is None or not exc.done:
                    exc.part = index
                    raise  # nothing of it went through: it leaves the unit
                part.upto = exc.done
                results[index] = exc.result
                results[index].next_offset = part.next_offset
            if part.fence is not None:
                unit.outbox[before:] = [replace(m, source_partition=part.fence.partition) for m in unit.outbox[before:]]
            results[index].staged_outbox = len(unit.outbox) - before
        return results

    async def _dead_letter_conflicted(self, record: RawRecord, fence: Fence | None, exc: ConflictsExhausted) -> BatchResult:
        """Commit just a dead letter for an event that never got through its conflicts."""
        with bound_contextvars(offset=record.offset):
            log.error("event_dead_lettered", stage="conflict", reason=str(exc))
        unit = UnitOfWork(self.store)
        unit.publish(
            dead_letter(record, self.topics.dead_letter, f"VersionConflict: {exc}", stage="conflict", error_type="VersionConflict")
        )
        await self.store.commit(unit, fence, record.offset + 1)
        return BatchResult(record.offset + 1, dead_lettered=1, conflicts=self.settings.conflict_max_attempts, staged_outbox=1)

    def _markers(self, decoded: Sequence[tuple[RawRecord, Event | DecodeError]]) -> list[Marker]:
        return [
            (app.id, item.source, item.id)
            for _, item in decoded
            if isinstance(item, Event) and item.is_post_message_sent
            for app in self.apps
        ]

    async def _run(
        self,
        unit: UnitOfWork,
        decoded: Sequence[tuple[RawRecord, Event | DecodeError]],
        next_offset: int,
        failures: HandlerFailures,
        *,
        done: set[Marker] | None = None,
        alone: bool = True,
    ) -> BatchResult:
        result = BatchResult(next_offset)
        if done is None:
            done = await unit.already_processed(self._markers(decoded))
        run = _BatchRun(
            unit,
            failures,
            alone,
            self.hooks,
            {app.id: (Read(PersistenceReader(unit, app.id), app.settings), PersistenceWriter(unit, app.id)) for app in self.apps},
        )
        # One log context for the batch: each line logged while an event runs gets its offset
        # and id from current_event, set per event instead of binding structlog's per event.
        context = current_event.set(None)
        try:
            for index, (record, item) in enumerate(decoded):
                if isinstance(item, DecodeError):
                    with bound_contextvars(offset=record.offset):
                        log.warning("record_invalid", reason=item.reason)
                    unit.publish(dead_letter(record, self.topics.dead_letter, item.reason, stage="decode"))
                    result.dead_lettered += 1
                    continue
                if not item.is_post_message_sent:
                    result.skipped += 1
                    result.outcomes.update((app.id, "skipped") for app in self.apps)
                    continue
                current_event.set((item.record.offset, item.id))
                with tracing.span("rc_worker.event", offset=item.record.offset, event_id=item.id):
                    outcomes = await self._run_event(run, item, done, index, result)
                for app_id, outcome in outcomes:
                    result.outcomes[app_id, outcome] += 1
                    if outcome == "duplicate":
                        result.duplicates += 1
                    else:
                        result.per_app[app_id] = result.per_app.get(app_id, 0) + 1
                result.processed += 1
        finally:
            current_event.reset(context)
            run.report()
        return result

    async def _run_event(self, run: _BatchRun, event: Event, done: set[Marker], index: int, result: BatchResult) -> list[tuple[str, str]]:
        """Every app on one event; returns (app id, outcome) of each.

        In a shared unit, a handler that must back off undoes the event's other apps and
        ends the batch's part there (see _Backoff), with what went through before it.
        """
        checkpoint = None if run.alone else run.unit.checkpoint()
        outcomes: list[tuple[str, str]] = []
        added: list[Marker] = []
        for app in self.apps:
            marker = (app.id, event.source, event.id)
            if marker in done:
                outcomes.append((app.id, "duplicate"))
                continue
            try:
                outcomes.append((app.id, await self._run_app(run, app, event, marker)))
            except _Backoff as exc:
                if checkpoint is not None:
                    run.unit.rollback_to(checkpoint)
                done.difference_update(added)
                exc.done, exc.result = index, result
                raise
            done.add(marker)
            added.append(marker)
        return outcomes

    async def _run_app(self, run: _BatchRun, app: App, event: Event, marker: Marker) -> str:
        """One app on one event: retried on its errors, dead-lettered when they persist; returns which.

        Not ``run.alone`` (in a unit with other partitions' batches), a failure that must back
        off raises _Backoff instead of waiting: the others do not wait with it.
        """
        unit, failures = run.unit, run.failures
        checkpoint = unit.checkpoint()
        message = event.message
        if message is None:  # the caller passes PostMessageSent events only
            raise TypeError("only PostMessageSent events reach apps")
        if message.sender.id == self.own_user_id and not app.handles_own_messages:
            unit.mark_processed(marker)
            return "skipped"
        read, persistence = run.accessors[app.id]
        while failures.runs[marker] < self.settings.handler_max_attempts:
            started = time.perf_counter()
            try:
                with tracing.span("rc_worker.handler", app=app.id):
                    limit = self.settings.handler_timeout_s
                    if await bounded(app.check_post_message_sent(message, read, self.http), limit):
                        modify = Modify(unit, app.id, event, self.topics.commands)
                        await bounded(app.execute_post_message_sent(message, read, self.http, persistence, modify), limit)
                if unit.failure is not None:
                    raise unit.failure
                unit.mark_processed(marker)
                run.ran(app.id, "ok", started)
                return "processed"
            except (VersionConflict, FencedError, PersistenceError):
                raise  # not the handler's doing: the whole batch is retried or abandoned
            except Exception as exc:
                run.ran(app.id, "error", started)
                if unit.failure is not None:
                    # The handler failed because the database did (perhaps wrapped in its own
                    # error): the batch is retried or abandoned, never this event dead-lettered.
                    raise unit.failure from exc
                unit.rollback_to(checkpoint)
                attempt = failures.failed(marker, exc)
                retriable = isinstance(exc, TimeoutError) or getattr(exc, "retriable", True)
                if not retriable:
                    break
                if attempt < self.settings.handler_max_attempts:
                    if not run.alone:
                        raise _Backoff(app.id) from exc
                    self.hooks.handler_retried(app.id)
                    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
                    log.info(
                        "handler_retry", app=app.id, attempt=attempt, error_type=type(exc).__name__, error=str(exc), duration_ms=elapsed_ms
                    )
                    await asyncio.sleep(backoff(attempt, self.settings))
        # Out of attempts, in this run or an earlier run of the batch: the last error decides.
        error, attempts = failures.last[marker], failures.runs[marker]
        failures.runs[marker] = self.settings.handler_max_attempts  # a non-retriable error ends it in every run
        log.error("handler_dead_lettered", app=app.id, attempts=attempts, error_type=type(error).__name__, error=str(error))
        unit.publish(
            dead_letter(
                event.record,
                self.topics.dead_letter,
                f"{type(error).__name__}: {error}",
                stage="handler",
                app_id=app.id,
                error_type=type(error).__name__,
            )
        )
        # Not marked processed: its state never changed, so a redrive of this event (or a
        # later redelivery) must be able to process it.
        return "dead_lettered"


# Handler run durations go to the hooks at most this often (and at the end of each batch),
# not once per run: counting is per batch, and a long batch still shows progress.
REPORT_EVERY_S = 1.0


@dataclass(slots=True)
class _BatchRun:
    """One run of a batch's events through the apps: its unit, accessors and handler timings."""

    unit: UnitOfWork
    failures: HandlerFailures
    alone: bool
    hooks: Hooks
    accessors: dict[str, tuple[Read, PersistenceWriter]]  # per app, made once per run
    durations: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    reported_at: float = field(default_factory=time.perf_counter)

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
            self.hooks.handler_runs(app_id, outcome, seconds)
        self.durations = {}
        self.reported_at = time.perf_counter()


def _decode(record: RawRecord) -> Event | DecodeError:
    try:
        return decode(record)
    except DecodeError as exc:
        return exc
