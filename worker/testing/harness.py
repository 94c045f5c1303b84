"""The harness: an app run over events through the worker's own dispatcher, against a throwaway SQLite database."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from worker import plugins
from worker.apps.accessors import Record
from worker.apps.contract import App
from worker.apps.http import Http
from worker.apps.readers import Directory
from worker.config import HttpSettings, PersistenceSettings, ProcessingSettings
from worker.errors import PluginError, VersionConflict
from worker.events import RawRecord, User
from worker.persistence.associations import Association
from worker.persistence.store import Fence, Store
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.pipeline.hooks import Hooks
from worker.pipeline.tally import BatchResult
from worker.rocketchat.stub import RocketChatStub
from worker.testing.builders import (
    COMMANDS_TOPIC,
    DEAD_LETTER_TOPIC,
    GROUP,
    TEST_PROCESSING,
    TOPIC,
    Events,
    file_records,
)
from worker.testing.http_stub import RecordingTransport
from worker.testing.state import Command, DeadLetter, Delivery, State, dead_letter_of, event_id_of, snapshot
from worker.tools.dump import FileRecord

_SCHEMA: dict[str, Path] = {}  # the migrated database that new ones are copied from


class Harness:
    """One app over a throwaway SQLite database, through the worker's real Dispatcher and Store.

    Use it as an async context manager; the database lives in a temporary directory that is
    removed at the end (unless ``directory`` is given). Example::

        async with Harness(MessageCount) as harness:
            delivery = await harness.deliver([message("hello", room="r1")])
            assert delivery.processed == 1
            records = await harness.records(Association(AssociationModel.ROOM, "r1"))

    Args:
        app: the App subclass, or the id of an installed plugin (``"message-count"``).
        settings: the app's settings, as ``handlers.settings.<app id>`` would give them;
            validated against its ``settings_model``.
        app_id: the id the app runs under; by default its entry point's name if the class
            is installed as a plugin, else its class name in kebab-case.
        directory: keep the database (``state.db``) in this directory instead.
        processing: retry and timeout settings; by default quick retries (``TEST_PROCESSING``).
        http: limits of the ``http`` accessor.
        rocketchat: a :class:`~worker.testing.RocketChatStub` that answers the user, room
            and message readers' REST calls (and names the app user); without it, they
            answer what the event carries and raise ``RocketChatUnavailable`` otherwise.
        app_user_id: the worker's own Rocket.Chat user (``rocketchat.app_user_id`` in
            production): ``read.get_user_reader().get_app_user()`` answers it, as do
            ``get_by_id`` and ``get_by_username`` for it, with no stub needed. Without it
            (and without a stub) ``get_app_user()`` raises ``RocketChatUnavailable``, as
            with no Rocket.Chat configured.
        app_username: the app user's username (a handler that compares usernames needs it).

    Raises:
        PluginError: the app is not installed, not a usable App, or its settings are invalid.

    """

    def __init__(
        self,
        app: type[App] | str,
        *,
        settings: Mapping[str, Any] | None = None,
        app_id: str | None = None,
        directory: str | os.PathLike[str] | None = None,
        processing: ProcessingSettings | None = None,
        http: HttpSettings | None = None,
        rocketchat: RocketChatStub | None = None,
        app_user_id: str | None = None,
        app_username: str | None = None,
    ) -> None:
        self._spec = AppSpec.resolve(app, app_id, settings or {}, rocketchat, app_user_of(app_user_id, app_username, rocketchat))
        self._spec.new_app()  # fail here, not at the first event, if the app cannot be set up
        self._directory = Path(directory) if directory is not None else None
        self._processing = processing or TEST_PROCESSING
        self._http = http or HttpSettings()
        self._temporary: Path | None = None
        self._lane: _Share | None = None

    @property
    def app_id(self) -> str:
        """The id the app runs under (its records are stored under it)."""
        return self._spec.app_id

    @property
    def app(self) -> App:
        """The app instance the dispatcher runs."""
        return self._running().app

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL of the throwaway database (for ``rc-worker state`` and the like)."""
        return self._running().url

    async def __aenter__(self) -> Harness:
        if self._directory is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="rc-worker-testing-"))
        url = await _new_database((self._directory or self._temporary or Path()) / "state.db")
        self._lane = await _Share.open(self._spec, url, 0, self._processing, self._http)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._lane is not None:
            await self._lane.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
        self._lane = self._temporary = None

    async def deliver(self, events: Events, *, batch_size: int = 1, check: bool = True) -> Delivery:
        """Deliver ``events`` in order, as Kafka records of one partition, and commit each batch.

        Args:
            events: IMessage dicts, CloudEvent dicts or Message objects, or the path of a
                contract JSON-lines file. Delivering an event again is a redelivery (the same
                CloudEvent), which the worker recognises.
            batch_size: records per unit of work (the worker commits a fetched batch at once).
            check: raise AssertionError if the handler failed on an event (it was retried,
                then dead-lettered); pass False to inspect :meth:`dead_letters` instead.

        Raises:
            ValueError: an event given as a dict or Message is not a contract event.
            AssertionError: ``check`` is set and the handler failed on some event.

        """
        store = self._running().store
        seen = {row_id for row_id, _ in await store.outbox_messages()}
        delivery = await self._running().run(file_records(events), batch_size)
        if check:
            failed = [
                dead_letter_of(m) for row_id, m in await store.outbox_messages() if row_id not in seen and m.topic == DEAD_LETTER_TOPIC
            ]
            failed = [d for d in failed if d.stage != "decode"]  # the handler, or conflicts that never ended
            if failed:
                reasons = "\n  ".join(f"{event_id_of(d.value)}: {d.reason}" for d in failed)
                raise AssertionError(
                    f"app {self.app_id!r} failed on {len(failed)} event(s), which were dead-lettered after "
                    f"{self._processing.handler_max_attempts} attempts:\n  {reasons}\n"
                    "(pass check=False to deliver() to inspect dead letters instead)"
                )
        return delivery

    async def state(self) -> State:
        """A snapshot of the app's records, the commands it staged and the dead letters."""
        return await snapshot(self._running().store, self.app_id)

    async def records(self, *associations: Association) -> list[Record]:
        """The app's records having every one of ``associations`` (all of them, given none)."""
        return (await self.state()).records_with(*associations)

    async def data(self, *associations: Association) -> list[dict[str, Any]]:
        """The data of the app's records having every one of ``associations``, ordered by record id."""
        return [r.data for r in await self.records(*associations)]

    async def dump(self) -> list[dict[str, Any]]:
        """Every record as JSON, as ``rc-worker state dump`` prints them."""
        return [
            {"id": r.id, "version": r.version, "associations": [str(a) for a in r.associations], "data": r.data}
            for r in await self.records()
        ]

    async def commands(self) -> list[Command]:
        """The commands staged by committed runs, oldest first: what the worker publishes."""
        return list((await self.state()).commands)

    async def dead_letters(self) -> list[DeadLetter]:
        """The records given up on, oldest first."""
        return list((await self.state()).dead_letters)

    def _running(self) -> _Share:
        if self._lane is None:
            raise RuntimeError("use the harness as `async with Harness(app) as harness:`")
        return self._lane


def run(
    app: type[App] | str,
    events: Events,
    *,
    settings: Mapping[str, Any] | None = None,
    app_id: str | None = None,
) -> State:
    """Deliver ``events`` to ``app`` over a fresh database and return the final state; synchronous.

    For scripts and synchronous tests: ``state = run(MessageCount, [message("hi")])``. In
    async code, use :class:`Harness` instead.

    Raises:
        RuntimeError: called inside a running event loop.
        AssertionError: the handler failed on an event (see :meth:`Harness.deliver`).

    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_run(app, events, settings, app_id))
    raise RuntimeError(
        "worker.testing.run() cannot be called inside a running event loop; in async code use "
        "`async with Harness(app) as harness: await harness.deliver(events)`"
    )


async def _run(app: type[App] | str, events: Events, settings: Mapping[str, Any] | None, app_id: str | None) -> State:
    async with Harness(app, settings=settings, app_id=app_id) as harness:
        await harness.deliver(events)
        return await harness.state()


def app_user_of(app_user_id: str | None, app_username: str | None, rocketchat: RocketChatStub | None) -> User | None:
    """The app user a test gives (``app_user_id``, ``app_username``), checked against the stub's.

    Raises:
        ValueError: only a username is given, or the id is not the stub's app user.

    """
    if app_user_id is None:
        if app_username is not None:
            raise ValueError("app_username needs app_user_id: give the app user's id too")
        return None
    if rocketchat is not None and rocketchat.settings.user_id != app_user_id:
        raise ValueError(
            f"app_user_id {app_user_id!r} is not the stub's app user {rocketchat.settings.user_id!r}: "
            "name the app user in one place, RocketChatStub(app_user=...) or app_user_id"
        )
    return User(id=app_user_id, username=app_username, type="app")


@dataclass(frozen=True, slots=True)
class AppSpec:
    """The app a check runs: its class, id and settings; each scenario makes fresh instances."""

    app_class: type[App]
    app_id: str
    settings: Mapping[str, Any]
    rocketchat: RocketChatStub | None = None
    app_user: User | None = None

    @classmethod
    def resolve(
        cls,
        app: type[App] | str,
        app_id: str | None,
        settings: Mapping[str, Any],
        rocketchat: RocketChatStub | None = None,
        app_user: User | None = None,
    ) -> AppSpec:
        """The app given as a class or as an installed plugin's id."""
        if isinstance(app, str):
            available = plugins.installed()
            if app not in available:
                raise PluginError(
                    f"no installed app has the id {app!r} (installed: {', '.join(available) or 'none'}); pass the App class instead"
                )
            return cls(plugins.load_class(available[app]), app_id or app, dict(settings), rocketchat, app_user)
        plugins.check_class(app, app_id or app.__name__)
        return cls(app, app_id or _default_id(app), dict(settings), rocketchat, app_user)

    def directory(self) -> Directory:
        """The readers' directory a lane of this app gets: over the stub if any, knowing the app user if given."""
        if self.rocketchat is not None:
            return Directory.over(self.rocketchat, self.app_user)
        return Directory(app_user=self.app_user)

    def new_app(self) -> App:
        """A fresh instance with the settings."""
        return plugins.instantiate(self.app_class, self.app_id, self.settings)

    def describe(self) -> str:
        """The app as a message names it."""
        return f"{self.app_class.__name__} (app {self.app_id!r})"


class _Share:
    """One worker's share: its own store (connections), app instance and dispatcher, on one partition."""

    def __init__(self, store: Store, app: App, dispatcher: Dispatcher, fence: Fence, http: Http, url: str) -> None:
        self.store, self.app, self.dispatcher, self.fence, self.http, self.url = store, app, dispatcher, fence, http, url
        self.next_offset = 0
        self.http_calls: Counter[str] = Counter()

    @classmethod
    async def open(
        cls,
        spec: AppSpec,
        url: str,
        partition: int,
        processing: ProcessingSettings,
        http_settings: HttpSettings,
        hooks: Hooks | None = None,
    ) -> _Share:
        app = spec.new_app()  # first: an app that cannot be set up leaves no store open behind it
        store = Store.from_settings(PersistenceSettings(url=url))
        claims = await store.claim(GROUP, TOPIC, [partition], owner=f"worker.testing:{partition}:{uuid.uuid4().hex[:8]}")
        recording = RecordingTransport()
        http = Http(http_settings, transport=recording)
        dispatcher = Dispatcher(
            [app], store, http, Topics(DEAD_LETTER_TOPIC, COMMANDS_TOPIC), processing, hooks, directory=spec.directory()
        )
        share = cls(store, app, dispatcher, claims[partition].fence, http, url)
        share.http_calls = recording.calls
        return share

    async def run(self, items: Sequence[FileRecord], batch_size: int) -> Delivery:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        results: list[BatchResult] = []
        for start in range(0, len(items), batch_size):
            batch = []
            for item in items[start : start + batch_size]:
                batch.append(RawRecord(TOPIC, self.fence.partition, self.next_offset, 0, item.key, item.value, item.headers))
                self.next_offset += 1
            results.append(await self.dispatcher.dispatch(batch, self.fence))
        total = BatchResult.total(results)
        # A batch counts an event its app dead-lettered as processed (it went through the
        # app); to a handler's author it is a dead letter, as an undecodable record is.
        return Delivery(
            records=len(items),
            processed=total.outcomes[self.app.id, "processed"],
            duplicates=total.duplicates,
            skipped=total.skipped,
            # Undecodable records, and the events the handler failed on (counted per app).
            dead_lettered=total.dead_lettered + sum(n for (_, outcome), n in total.outcomes.items() if outcome == "dead_lettered"),
            conflicts=total.conflicts,
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.dispatcher.directory.aclose()
        await self.store.close()


class _RepeatingCommits(Hooks):
    """Refuses the first commit of every batch, as a concurrent worker's change would, so every run is repeated.

    The dispatcher calls ``commit()`` around each commit of a batch and runs the batch again
    after a refusal; the retry's commit goes through: refusals and commits alternate.
    """

    def __init__(self) -> None:
        self._refuse = True

    def commit(self) -> contextlib.AbstractContextManager[None]:
        refuse, self._refuse = self._refuse, not self._refuse
        if refuse:
            raise VersionConflict("worker.testing refuses the first commit of each batch, so that every handler run is repeated")
        return contextlib.nullcontext()


async def _new_database(path: Path) -> str:
    """A migrated SQLite database at ``path``: a copy of one migrated once per process; returns its URL."""
    template = _SCHEMA.get("template")
    if template is None or not template.exists():
        directory = Path(tempfile.mkdtemp(prefix="rc-worker-testing-schema-"))
        atexit.register(shutil.rmtree, directory, True)
        store = Store.from_settings(PersistenceSettings(url=_sqlite_url(directory / "schema.db")))
        try:
            await store.upgrade()
        finally:
            await store.close()  # the last connection out checkpoints the WAL into the file
        template = _SCHEMA["template"] = directory / "schema.db"
    shutil.copyfile(template, path)
    return _sqlite_url(path)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a scenario left, and the http calls its app made (by ``"METHOD url"``)."""

    state: State
    http_calls: Counter[str]


async def run_scenario(spec: AppSpec, deliveries: Sequence[Sequence[FileRecord]], *, repeat_runs: bool = False) -> Outcome:
    """A fresh database, one lane, the deliveries in order; what it left at the end."""
    with tempfile.TemporaryDirectory(prefix="rc-worker-testing-") as directory:
        url = await _new_database(Path(directory) / "state.db")
        lane = await _Share.open(spec, url, 0, TEST_PROCESSING, HttpSettings(), _RepeatingCommits() if repeat_runs else None)
        try:
            for items in deliveries:
                await lane.run(items, batch_size=1)
            return Outcome(await snapshot(lane.store, spec.app_id), lane.http_calls)
        finally:
            await lane.close()


async def run_concurrently(spec: AppSpec, shares: Sequence[Sequence[FileRecord]]) -> State:
    """A fresh database and one lane per share, all running at once; the state at the end."""
    with tempfile.TemporaryDirectory(prefix="rc-worker-testing-") as directory:
        url = await _new_database(Path(directory) / "state.db")
        lanes = [await _Share.open(spec, url, n, TEST_PROCESSING, HttpSettings()) for n in range(len(shares))]
        try:
            async with asyncio.TaskGroup() as group:
                for lane, items in zip(lanes, shares, strict=True):
                    group.create_task(lane.run(items, batch_size=1))
            return await snapshot(lanes[0].store, spec.app_id)
        finally:
            for lane in lanes:
                await lane.close()


def _default_id(app_class: type[App]) -> str:
    target = f"{app_class.__module__}:{app_class.__qualname__}"
    with contextlib.suppress(PluginError):
        for app_id, plugin in plugins.installed().items():
            if plugin.value == target:
                return app_id
    return re.sub(r"(?<!^)(?=[A-Z])", "-", app_class.__name__).lower()


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"
