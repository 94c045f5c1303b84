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
from collections.abc import Sequence
from dataclasses import dataclass, field

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
from worker.persistence.keys import Marker
from worker.persistence.store import Fence, Store
from worker.persistence.unit import Snapshot, UnitOfWork
from worker.pipeline.dead_letters import dead_letter
from worker.pipeline.hooks import Hooks, contained
from worker.pipeline.retry import backoff
from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.dispatch")


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


@dataclass(frozen=True, slots=True)
class Topics:
    """Where dead letters and commands go."""

    dead_letter: str
    commands: str


class Dispatcher:
    """Turns a batch of records into one committed unit of work."""

    def __init__(
        self, apps: Sequence[App], store: Store, http: Http, topics: Topics, settings: ProcessingSettings, hooks: Hooks | None = None
    ) -> None:
        self.apps = list(apps)
        self.hooks = contained(hooks)
        self.store = store
        self.http = http
        self.topics = topics
        self.settings = settings

    async def dispatch(
        self, records: Sequence[RawRecord], fence: Fence | None, *, locked: bool = False, snapshot: Snapshot | None = None
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
            return await self._attempts(decoded, fence, locked, snapshot or Snapshot())
        except ConflictsExhausted as exc:
            if len(records) == 1:
                return await self._dead_letter_conflicted(records[0], fence, exc)
            log.warning("batch_split", records=len(records), reason=str(exc))
            merged = BatchResult(records[-1].offset + 1)
            for record in records:
                merged.add(await self.dispatch([record], fence, locked=True, snapshot=snapshot))
            return merged

    async def _attempts(
        self, decoded: Sequence[tuple[RawRecord, Event | DecodeError]], fence: Fence | None, locked: bool, snapshot: Snapshot
    ) -> BatchResult:
        next_offset = decoded[-1][0].offset + 1
        failures = HandlerFailures()
        for attempt in range(1, self.settings.conflict_max_attempts + 1):
            hold = locked or attempt > 1
            try:
                result = await self._attempt(decoded, fence, next_offset, snapshot, failures, locked=hold)
            except VersionConflict as exc:
                self.hooks.conflict(exc)
                if exc.keys is None:
                    snapshot.clear()
                else:
                    snapshot.forget(exc.keys)
                log.info("batch_conflict", attempt=attempt, records=len(decoded), locked=hold, reason=str(exc))
                await asyncio.sleep(backoff(attempt, self.settings))
                continue
            result.conflicts = attempt - 1
            result.locked = hold
            return result
        raise ConflictsExhausted(
            f"batch of {len(decoded)} records ending at offset {next_offset - 1} conflicted "
            f"{self.settings.conflict_max_attempts} times; raise processing.conflict_max_attempts or reduce contention"
        )

    async def _attempt(
        self,
        decoded: Sequence[tuple[RawRecord, Event | DecodeError]],
        fence: Fence | None,
        next_offset: int,
        snapshot: Snapshot,
        failures: HandlerFailures,
        *,
        locked: bool,
    ) -> BatchResult:
        unit = UnitOfWork(self.store, snapshot)
        result = await self._run(unit, decoded, next_offset, failures)
        if locked:
            # The handlers ran first without locks, so their work and most of their reads do
            # not hold anyone up; now what they read and wrote is locked, in one statement.
            # Only if some of it changed meanwhile do they run again, inside the locks,
            # re-reading just that: the commit can then no longer conflict on it.
            async with self.store.session() as session:
                if not await session.revalidate(unit, snapshot):
                    unit = UnitOfWork(session, snapshot)
                    result = await self._run(unit, decoded, next_offset, failures)
                with self.hooks.commit():
                    new_versions = await session.commit(unit, fence, next_offset)
        else:
            with self.hooks.commit():
                new_versions = await self.store.commit(unit, fence, next_offset)
        snapshot.absorb(unit, new_versions)  # only once the transaction has committed
        result.staged_outbox = len(unit.outbox)
        return result

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

    async def _run(
        self, unit: UnitOfWork, decoded: Sequence[tuple[RawRecord, Event | DecodeError]], next_offset: int, failures: HandlerFailures
    ) -> BatchResult:
        result = BatchResult(next_offset)
        done = await unit.already_processed(
            [
                (app.id, item.source, item.id)
                for _, item in decoded
                if isinstance(item, Event) and item.is_post_message_sent
                for app in self.apps
            ]
        )
        for record, item in decoded:
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
            with (
                bound_contextvars(offset=item.record.offset, event_id=item.id),
                tracing.span("rc_worker.event", offset=item.record.offset, event_id=item.id),
            ):
                for app in self.apps:
                    marker = (app.id, item.source, item.id)
                    if marker in done:
                        result.duplicates += 1
                        result.outcomes[app.id, "duplicate"] += 1
                        continue
                    result.outcomes[app.id, await self._run_app(unit, app, item, marker, failures)] += 1
                    done.add(marker)
                    result.per_app[app.id] = result.per_app.get(app.id, 0) + 1
            result.processed += 1
        return result

    async def _run_app(self, unit: UnitOfWork, app: App, event: Event, marker: Marker, failures: HandlerFailures) -> str:
        """One app on one event: retried on its errors, dead-lettered when they persist; returns which."""
        checkpoint = unit.checkpoint()
        message = event.message
        if message is None:  # the caller passes PostMessageSent events only
            raise TypeError("only PostMessageSent events reach apps")
        while failures.runs[marker] < self.settings.handler_max_attempts:
            started = time.perf_counter()
            try:
                with tracing.span("rc_worker.handler", app=app.id):
                    async with asyncio.timeout(self.settings.handler_timeout_s), self.hooks.handler(app.id):
                        read = Read(PersistenceReader(unit, app.id), app.settings)
                        if await app.check_post_message_sent(message, read, self.http):
                            modify = Modify(unit, app.id, event, self.topics.commands)
                            await app.execute_post_message_sent(message, read, self.http, PersistenceWriter(unit, app.id), modify)
                if unit.failure is not None:
                    raise unit.failure
                unit.mark_processed(marker)
                return "processed"
            except (VersionConflict, FencedError, PersistenceError):
                raise  # not the handler's doing: the whole batch is retried or abandoned
            except Exception as exc:
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


def _decode(record: RawRecord) -> Event | DecodeError:
    try:
        return decode(record)
    except DecodeError as exc:
        return exc
