"""Run the enabled apps over one partition's batch of records, as one unit of work.

Records are decoded, invalid ones staged as dead letters, events no app takes skipped, and
every other event run through each app that takes it, in order, unless that app has
already processed it (a redelivery or a publisher's retry; see ``apprun`` for one app's
run). The unit then commits with the partition's next offset; on a version conflict the
whole batch runs again on fresh data. A value the database refuses for good (``DataError``)
splits the batch in halves until the one event that carries it is found: that event is
dead-lettered, the rest commit in order. Several partitions' batches can also run as one
unit (``dispatch_together``, driven by ``combine``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import structlog
from structlog.contextvars import bound_contextvars

from worker.apps.contract import App
from worker.apps.http import Http
from worker.apps.readers import Directory
from worker.config import ProcessingSettings
from worker.errors import DataError, DecodeError, InvalidDataError, VersionConflict, WorkerError
from worker.events import Event, RawRecord
from worker.persistence.keys import ROOM_PREFIX, Key, Marker
from worker.persistence.records import OutboxMessage
from worker.persistence.snapshot import Snapshot
from worker.persistence.store import Fence, LockedSession, Store
from worker.persistence.unit import UnitOfWork
from worker.pipeline.apprun import Backoff, BatchRun, Decoded, HandlerFailures, Pass, Surroundings, Takers, Topics
from worker.pipeline.dead_letters import dead_letter
from worker.pipeline.hooks import Hooks, contained
from worker.pipeline.parts import Advances, Part, advances_of, decode_or_reason
from worker.pipeline.retry import backoff
from worker.pipeline.tally import BatchResult

log = structlog.get_logger("worker.dispatch")
_R = TypeVar("_R")


@dataclass(frozen=True, slots=True)
class Passes:
    """A locked unit's two passes over its events: the apps ``later`` run after ``between`` has locked the hot keys."""

    later: frozenset[str]  # the apps that own a hot key
    between: Callable[[], Awaitable[None]]


class ConflictsExhausted(WorkerError):
    """Raised when a batch still conflicts after ``processing.conflict_max_attempts`` runs."""

    retriable = True


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
        directory: Directory | None = None,
    ) -> None:
        self.apps = list(apps)
        self.hooks = contained(hooks)
        # The loop guard: messages this user sent (the app's own) skip apps that do not opt in.
        self.own_user_id = own_user_id
        self.store = store
        self.http = http
        self.topics = topics
        self.settings = settings
        self.directory = directory or Directory()
        # Apps seen reading all of a room's records: their next batches' rooms are read ahead.
        self.room_readers: set[str] = set()
        self.takers = Takers(self.apps)

    async def dispatch(
        self,
        records: Sequence[RawRecord],
        fence: Fence | None,
        *,
        locked: bool = False,
        snapshot: Snapshot | None = None,
        failures: HandlerFailures | None = None,
        advance: bool = True,
    ) -> BatchResult:
        """Process ``records`` (one partition, in offset order) and commit them with the next offset.

        The first attempt is optimistic unless ``locked``; every attempt after a conflict
        runs locked (see ``Store.session``). A batch that still conflicts is split into its
        events, and an event that still conflicts alone is dead-lettered as such. A batch the
        database refuses a value of is bisected (see ``_isolate``). Reads are served from
        ``snapshot`` where it has them, and the commit is folded back into it. Without
        ``advance`` the partition's offset stays where it is (the fence is still checked).
        ``failures``: the handler failures counted so far (a batch that left a shared unit).

        Raises:
            FencedError: the partition was taken over; nothing was committed.
            PersistenceError: the database failed; nothing was committed.

        """
        decoded = [(record, decode_or_reason(record)) for record in records]
        snapshot = snapshot if snapshot is not None else Snapshot()
        try:
            return await self._attempts(decoded, fence, locked, snapshot, failures or HandlerFailures(), advance)
        except ConflictsExhausted as exc:
            if len(records) == 1:
                return await self._dead_letter_refused(records[0], fence, advance, exc, stage="conflict", error_type="VersionConflict")
            log.warning("batch_split", records=len(records), reason=str(exc))
            merged = BatchResult(records[-1].offset + 1)
            for record in records:
                merged.add(await self.dispatch([record], fence, locked=True, snapshot=snapshot, advance=advance))
            return merged
        except DataError as exc:
            return await self._isolate(records, fence, locked, snapshot, advance, exc)

    async def _isolate(
        self, records: Sequence[RawRecord], fence: Fence | None, locked: bool, snapshot: Snapshot, advance: bool, exc: DataError
    ) -> BatchResult:
        """Find the event (and app) whose value the database refused; dead-letter it, commit the rest.

        Halves commit one after the other, in offset order, each with its own next offset, so
        a poison value costs about log2(batch) commits. One event with several apps runs each
        app alone, keeping the offset until the last, so that a crash in between redelivers
        the event and the apps already committed skip it as a duplicate.
        """
        if len(records) > 1:
            log.warning("batch_bisected", records=len(records), first_offset=records[0].offset, reason=str(exc))
            middle = len(records) // 2
            merged = BatchResult(records[-1].offset + 1)
            for part in (records[:middle], records[middle:]):
                merged.add(await self.dispatch(part, fence, locked=locked, snapshot=snapshot, advance=advance))
            return merged
        record = records[0]
        if len(self.apps) <= 1:
            app_id = self.apps[0].id if self.apps else None
            return await self._dead_letter_refused(record, fence, advance, exc, stage="commit", error_type="DataError", app_id=app_id)
        merged = BatchResult(record.offset + 1)
        for app in self.apps:
            alone = Dispatcher(
                [app], self.store, self.http, self.topics, self.settings, self.hooks, own_user_id=self.own_user_id, directory=self.directory
            )
            merged.add(await alone.dispatch(records, fence, locked=locked, snapshot=snapshot, advance=False))
        merged.processed = min(merged.processed, 1)  # one event, however many apps ran it
        merged.skipped = min(merged.skipped, 1)
        if advance and fence is not None:
            await self.store.commit(UnitOfWork(self.store), fence, record.offset + 1)
        return merged

    async def _attempts(
        self, decoded: Decoded, fence: Fence | None, locked: bool, snapshot: Snapshot, failures: HandlerFailures, advance: bool
    ) -> BatchResult:
        next_offset = decoded[-1][0].offset + 1
        commit_offset = next_offset if advance else None  # what the commit advances to
        for attempt in range(1, self.settings.conflict_max_attempts + 1):
            hold = locked or attempt > 1
            try:
                result, unit = await self._attempt(
                    lambda unit: self._run(unit, decoded, next_offset, failures), snapshot, hold, lambda: (fence, commit_offset, [])
                )
            except VersionConflict as exc:
                await self._conflicted(exc, snapshot, attempt, len(decoded), hold)
                continue
            result.conflicts, result.locked, result.staged_outbox = attempt - 1, hold, len(unit.outbox)
            self._report_dead_letters(result)
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
        advances: Callable[[], Advances],
    ) -> tuple[_R, UnitOfWork]:
        """Run ``run`` in a fresh unit and commit it with the offsets ``advances`` gives after the run.

        Optimistic, or ``locked`` (see below); with hot keys, see ``_attempt_hot``.
        """
        unit = UnitOfWork(self.store, snapshot)
        result = await run(unit)
        if not locked:
            with self.hooks.commit():
                new_versions = await self.store.commit(unit, *advances())
        else:
            # The handlers ran first without locks, so their work and most of their reads do
            # not hold anyone up; now what they read and wrote is locked, in one statement.
            # Only if some of it changed meanwhile do they run again, inside the locks,
            # which cannot conflict.
            async with self.store.session() as session:
                if not await session.revalidate(unit, snapshot):
                    unit = UnitOfWork(session, snapshot)
                    result = await run(unit)
                with self.hooks.commit():
                    new_versions = await session.commit(unit, *advances())
        snapshot.absorb(unit, new_versions)  # only once the transaction has committed
        self.room_readers |= unit.room_readers
        return result, unit

    async def _attempt_hot(
        self, run: Callable[[UnitOfWork, Passes], Awaitable[_R]], snapshot: Snapshot, advances: Callable[[], Advances], hot: Collection[Key]
    ) -> tuple[_R, UnitOfWork]:
        # Keys that other workers keep changing (an app-global counter) are locked, in one
        # statement in key order, before the apps that own them run: those run once, never
        # again because a hot key changed under them. Lockers of the same hot keys queue on
        # them, so the keys each takes later cannot deadlock with another's. The other apps
        # run first, before the locks: the workers take turns only for the hot apps' runs
        # and the commit, not for the whole unit.
        async with contextlib.AsyncExitStack() as stack:
            unit = UnitOfWork(self.store, snapshot)
            sessions: list[LockedSession] = []

            async def take_locks() -> None:
                if sessions:
                    return
                session = await stack.enter_async_context(self.store.session())
                # With what the other apps read and wrote (an app-global key of theirs too), in
                # one statement in key order, as every locker takes them: lockers queue, and
                # never hold one of those while waiting for a hot key another holds.
                current = await session.lock(set(hot) | unit.seen.keys() | unit.written)
                changed = sorted(key for key, version in unit.seen.items() if current[key] != version)
                if changed:  # they read something another worker changed since: run it all again, knowing that
                    raise VersionConflict(
                        f"{len(changed)} key(s) changed since read, first {changed[0][1]!r} of app {changed[0][0]!r}",
                        keys=frozenset(changed),
                    )
                snapshot.forget([key for key in hot if snapshot.versions.get(key) != current[key]])
                unit.loader = session  # what the hot apps read now is read, and locked, in the session
                sessions.append(session)

            result = await run(unit, Passes(frozenset(app_id for app_id, _ in hot), take_locks))
            await take_locks()
            with self.hooks.commit():
                new_versions = await sessions[0].commit(unit, *advances())
        snapshot.absorb(unit, new_versions)
        self.room_readers |= unit.room_readers
        return result, unit

    # -- several partitions' batches as one unit of work ----------------------------------

    async def dispatch_together(self, parts: Sequence[Part], snapshot: Snapshot, hot: set[Key] | None = None) -> dict[int, BatchResult]:
        """Process several partitions' batches (each in offset order) as one unit and one commit.

        The worker's partitions then never conflict with each other on a key they share (an
        app-global counter): their batches take turns in one unit, reading each other's
        writes. Conflicts with other workers run the unit again, locked after the first; the
        keys they conflicted on join ``hot``, which (kept by the caller from unit to unit) are
        locked before the handlers of the apps that own them run, so that those run once, and
        after the other apps' runs (see ``_attempt_hot``). Returns each committed part's
        result by its index in ``parts``; a part left out failed a handler that must back off
        before its next try, and must be dispatched on its own (with its ``failures``), so
        that its wait holds up no other partition.

        Raises:
            FencedError, PersistenceError, ConflictsExhausted: nothing was committed; dispatch
                each part on its own, which tells them apart (and bisects a refused value).

        """
        remaining, conflicts, hot = list(range(len(parts))), 0, set() if hot is None else hot
        while remaining:
            hold = conflicts > 0 or bool(hot)
            advances = lambda: advances_of([parts[i] for i in remaining])  # after the run, which may cut parts
            try:
                if hot and not self.store.is_sqlite:
                    results, _ = await self._attempt_hot(
                        lambda unit, passes: self._run_parts(unit, parts, remaining, passes), snapshot, advances, hot
                    )
                else:
                    results, _ = await self._attempt(lambda unit: self._run_parts(unit, parts, remaining), snapshot, hold, advances)
            except Backoff as exc:
                remaining.remove(exc.part)
                continue
            except VersionConflict as exc:
                conflicts += 1
                if not self.store.is_sqlite:
                    # Locking a key on SQLite locks the whole database: held while handlers
                    # run, it would stop every other writer (and the handlers' own awaits on
                    # them) for the length of the run. There the revalidating path serves.
                    hot.update(exc.keys or ())
                if conflicts >= self.settings.conflict_max_attempts:
                    raise ConflictsExhausted(f"{len(remaining)} partitions' batches conflicted {conflicts} times together") from exc
                await self._conflicted(exc, snapshot, conflicts, sum(len(parts[i].decoded) for i in remaining), hold)
                continue
            for result in results.values():
                result.conflicts, result.locked = conflicts, hold
                self._report_dead_letters(result)
            return results
        return {}

    async def _run_parts(
        self, unit: UnitOfWork, parts: Sequence[Part], indexes: Sequence[int], passes: Passes | None = None
    ) -> dict[int, BatchResult]:
        done = await unit.already_processed([marker for i in indexes for marker in self.takers.markers(parts[i].decoded)])
        await self._prefetch(unit, [item for i in indexes for _, item in parts[i].decoded])
        results: dict[int, BatchResult] = {}
        # Each part's outbox records, and with two passes the index of the event that staged each.
        staged: dict[int, list[OutboxMessage]] = {}
        tags: dict[int, list[int]] = {}
        for index in indexes:
            part = parts[index]
            part.upto = len(part.records)
            before, first = len(unit.outbox), Pass(passes.later, tags=[]) if passes is not None else Pass()
            try:
                results[index] = await self._run(unit, part.decoded, part.next_offset, part.failures, done=done, alone=False, passing=first)
            except Backoff as exc:
                if exc.result is None or not exc.done:
                    exc.part = index
                    raise  # nothing of it went through: it leaves the unit
                part.upto = exc.done
                results[index] = exc.result
                results[index].next_offset = part.next_offset
            staged[index], tags[index] = unit.outbox[before:], first.tags or []
            del unit.outbox[before:]
        if passes is not None:
            await passes.between()
            for index in indexes:
                part = parts[index]
                before, second = len(unit.outbox), Pass(passes.later, second=True, tags=[])
                try:
                    ran = await self._run(
                        unit, part.decoded[: part.upto], part.next_offset, part.failures, done=done, alone=False, passing=second
                    )
                except Backoff as exc:
                    # Its other apps have run past this event, and cannot be undone alone: the
                    # part leaves the unit whole, and runs again on its own after its wait.
                    exc.part, exc.done, exc.result = index, 0, None
                    raise
                results[index].add(ran)
                staged[index] += unit.outbox[before:]
                tags[index] += second.tags or []
                del unit.outbox[before:]
                # In event order, and each event's in app order, as one pass stages them.
                order = sorted(zip(tags[index], staged[index], strict=True), key=lambda item: (item[0], self.takers.rank(item[1].app_id)))
                staged[index] = [m for _, m in order]
        for index in indexes:
            messages = staged[index]
            fence = parts[index].fence
            if fence is not None:
                messages = [replace(m, source_partition=fence.partition) for m in messages]
            unit.outbox += messages
            results[index].staged_outbox = len(messages)
        return results

    async def _prefetch(self, unit: UnitOfWork, items: Sequence[Event | DecodeError]) -> None:
        # One read for the rooms of the whole batch instead of one per room on its first
        # event (see UnitOfWork.prefetch); learned, so an app that never reads a room costs
        # nothing. An app not learned yet reads them all at its first room read in the unit.
        unit.rooms_ahead = frozenset(
            ROOM_PREFIX + item.message.room.id for item in items if isinstance(item, Event) and item.message is not None
        )
        if not self.room_readers:
            return
        rooms = sorted(unit.rooms_ahead)
        for app_id in sorted(self.room_readers):
            try:
                await unit.prefetch(app_id, rooms)
            except InvalidDataError:
                return  # a room id the store refuses: the handler's own read reports it

    def _report_dead_letters(self, result: BatchResult) -> None:
        # Reported once their commit succeeded, not where they are staged: a batch that
        # conflicts runs again and stages them again.
        for (app_id, outcome), count in sorted(result.outcomes.items()):
            if outcome == "dead_lettered":
                self.hooks.dead_lettered(app_id, count)
        if result.dead_lettered:
            self.hooks.dead_lettered(None, result.dead_lettered)

    async def _dead_letter_refused(
        self,
        record: RawRecord,
        fence: Fence | None,
        advance: bool,
        exc: WorkerError,
        *,
        stage: str,
        error_type: str,
        app_id: str | None = None,
    ) -> BatchResult:
        """Commit just a dead letter for an event that cannot commit: conflicts without end, or a refused value."""
        with bound_contextvars(offset=record.offset):
            log.error("event_dead_lettered", stage=stage, app=app_id, reason=str(exc))
        unit = UnitOfWork(self.store)
        unit.publish(
            dead_letter(record, self.topics.dead_letter, f"{error_type}: {exc}", stage=stage, app_id=app_id, error_type=error_type)
        )
        await self.store.commit(unit, fence, record.offset + 1 if advance else None)
        result = BatchResult(record.offset + 1, staged_outbox=1)
        if stage == "conflict":
            result.conflicts = self.settings.conflict_max_attempts
        if app_id is None:
            result.dead_lettered = 1  # the record whole, as an undecodable one
        else:  # that app's event, as when its handler fails: the event went through the apps
            result.processed = 1
            result.outcomes[app_id, "dead_lettered"] += 1
        self._report_dead_letters(result)
        return result

    # -- one run of a batch's events ---------------------------------------------------------

    async def _run(
        self,
        unit: UnitOfWork,
        decoded: Decoded,
        next_offset: int,
        failures: HandlerFailures,
        *,
        done: set[Marker] | None = None,
        alone: bool = True,
        passing: Pass | None = None,
    ) -> BatchResult:
        """Run ``decoded`` through the apps (those of ``passing``) in ``unit``; what it did."""
        result = BatchResult(next_offset)
        if done is None:
            done = await unit.already_processed(self.takers.markers(decoded))
            await self._prefetch(unit, [item for _, item in decoded])
        around = Surroundings(self.http, self.topics, self.settings, self.hooks, self.directory, self.own_user_id)
        await BatchRun(unit, failures, alone, around).events(decoded, self.takers, done, result, passing or Pass())
        return result


__all__ = ["ConflictsExhausted", "Dispatcher", "HandlerFailures", "Part", "Topics"]
