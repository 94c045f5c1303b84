"""What handler authors use in their own tests: run an app over events against a throwaway database.

Events go through the worker's own code, as in production: each becomes a Kafka record
(CloudEvents structured mode, keyed by room id), the real :class:`~worker.dispatch.Dispatcher`
runs the app on it in a unit of work, and the real :class:`~worker.persistence.store.Store`
commits it to a SQLite file in a temporary directory. The test then reads the app's records
and the commands it staged. Two checks catch what only shows in a cluster:

- :func:`assert_idempotent`: every event delivered twice, and every handler run repeated as
  after a version conflict, must leave the state that a single run leaves.
- :func:`assert_concurrency_safe`: several copies of the app processing the events at once,
  over one database, must leave the state that one copy processing them in order leaves.

Example::

    from worker.testing import Harness, assert_idempotent, message

    async def test_counts_messages():
        async with Harness(MessageCount) as harness:
            await harness.deliver([message("hi"), message("ho")])
            assert await harness.data(Association(AssociationModel.MISC, "message-count")) == [{"count": 2}]

    async def test_is_idempotent():
        await assert_idempotent(MessageCount, [message("hi"), message("ho")])
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import http.server
import itertools
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from worker import constants, plugins
from worker.apps import App, Record
from worker.config import HttpSettings, PersistenceSettings, ProcessingSettings
from worker.dispatch import BatchResult, Dispatcher, Topics
from worker.errors import DecodeError, PluginError, VersionConflict
from worker.events import Message, RawRecord, decode
from worker.http import Http
from worker.persistence.associations import Association
from worker.persistence.store import Fence, Store
from worker.persistence.unit import OutboxMessage, UnitOfWork, decode_data

#: CloudEvents ``source`` of the events that :func:`cloud_event` wraps messages in.
SOURCE = "//worker.testing"
#: The topic, consumer group and output topics the harness pretends to use.
TOPIC = "worker.testing"
GROUP = "worker.testing"
DEAD_LETTER_TOPIC = f"{TOPIC}.dlq"
COMMANDS_TOPIC = constants.DEFAULT_COMMANDS_TOPIC

#: Quick retries, so that tests of failing handlers stay fast; conflicts are retried for long,
#: as concurrent copies over one SQLite file conflict often.
TEST_PROCESSING = ProcessingSettings(
    conflict_max_attempts=200, handler_max_attempts=3, backoff_initial_ms=1, backoff_max_ms=20, handler_timeout_s=30
)

Events = Iterable[Mapping[str, Any] | Message] | os.PathLike[str]
"""What :meth:`Harness.deliver` and the checks accept: messages as dicts (IMessage JSON, or whole
CloudEvents with ``specversion``) or :class:`~worker.Message` objects, or the path of a contract
JSON-lines file (one Kafka record a line, as ``rc-worker load`` reads)."""

_numbers = itertools.count(1)
_SCHEMA: dict[str, Path] = {}  # the migrated database that new ones are copied from
_BASE_TIME = datetime(2026, 1, 1, 9, 0, tzinfo=UTC)


# -- building events -------------------------------------------------------------------------


def message(
    text: str | None = "",
    *,
    room: str = "general",
    sender: str = "alice",
    message_id: str | None = None,
    created_at: datetime | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An IMessage as JSON, with defaults for everything a test does not care about.

    Args:
        text: the message text (None leaves it out, as for attachment-only messages).
        room: the room id (also its slugified name); rooms are of type ``c``.
        sender: the sender's username; its id is ``id-<username>``.
        message_id: the message id; by default a new one (``msg-1``, ``msg-2``, ...). The
            event id is derived from it, so two messages with one id are one event.
        created_at: an aware datetime; by default one second after the previous message's.
        **fields: more IMessage fields, under their JSON names (``threadId``,
            ``customFields``, ``attachments``, or any field the contract does not list).

    """
    number = next(_numbers)
    data: dict[str, Any] = {
        "id": message_id or f"msg-{number}",
        "room": {"id": room, "slugifiedName": room, "type": "c"},
        "sender": {"id": f"id-{sender}", "username": sender, "name": sender.title()},
        "createdAt": _timestamp(created_at or _BASE_TIME + timedelta(seconds=number)),
    }
    if text is not None:
        data["text"] = text
    data.update(fields)
    return data


def cloud_event(data: Mapping[str, Any], *, event_id: str | None = None, source: str = SOURCE) -> dict[str, Any]:
    """Wrap IMessage JSON in a PostMessageSent CloudEvent; its id is ``evt-<message id>`` by default."""
    return {
        "specversion": constants.CLOUDEVENTS_SPECVERSION,
        "type": constants.POST_MESSAGE_SENT,
        "source": source,
        "id": event_id or f"evt-{data.get('id', uuid.uuid4().hex)}",
        "datacontenttype": "application/json",
        "data": dict(data),
    }


# -- what a test inspects --------------------------------------------------------------------


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


# -- the harness -----------------------------------------------------------------------------


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
    ) -> None:
        self._spec = _AppSpec.resolve(app, app_id, settings or {})
        self._spec.new_app()  # fail here, not at the first event, if the app cannot be set up
        self._directory = Path(directory) if directory is not None else None
        self._processing = processing or TEST_PROCESSING
        self._http = http or HttpSettings()
        self._temporary: Path | None = None
        self._lane: _Lane | None = None

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
        self._lane = await _Lane.open(self._spec, url, 0, self._processing, self._http)
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
        delivery = await self._running().run(_items(events), batch_size)
        if check:
            failed = [_dead_letter(m) for row_id, m in await store.outbox_messages() if row_id not in seen and m.topic == DEAD_LETTER_TOPIC]
            failed = [d for d in failed if d.stage != "decode"]  # the handler, or conflicts that never ended
            if failed:
                reasons = "\n  ".join(f"{_event_id(d.value)}: {d.reason}" for d in failed)
                raise AssertionError(
                    f"app {self.app_id!r} failed on {len(failed)} event(s), which were dead-lettered after "
                    f"{self._processing.handler_max_attempts} attempts:\n  {reasons}\n"
                    "(pass check=False to deliver() to inspect dead letters instead)"
                )
        return delivery

    async def state(self) -> State:
        """A snapshot of the app's records, the commands it staged and the dead letters."""
        return await _snapshot(self._running().store, self.app_id)

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

    def _running(self) -> _Lane:
        if self._lane is None:
            raise RuntimeError("use the harness as `async with Harness(app) as harness:`")
        return self._lane


# -- the checks ------------------------------------------------------------------------------

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
    repeated = await _scenario(spec, [items], store_class=_RepeatingStore)
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


# -- an HTTP service stub --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StubRequest:
    """A request an :class:`HttpStub` received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return orjson.loads(self.body)


Route = Callable[[StubRequest], "tuple[int, Any] | tuple[int, Any, Mapping[str, str]]"]


class HttpStub:
    """A real HTTP server on 127.0.0.1, in a thread, for testing handlers that call services.

    Each route answers ``"METHOD /path"`` with ``(status, body)`` or ``(status, body,
    headers)``; a dict or list body is sent as JSON, str as text, bytes as they are, and an
    iterator of bytes is streamed without a content-length. Requests are served one at a
    time, so routes may keep counters without locks. Example::

        with HttpStub({"GET /weather": lambda request: (200, {"sky": "blue"})}) as stub:
            ...  # settings={"url": stub.url + "/weather"}
        assert stub.requests[0].method == "GET"

    Attributes:
        url: ``http://127.0.0.1:<port>``, set once started.
        requests: every request received, in order.

    """

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = dict(routes)
        self.requests: list[StubRequest] = []
        self.url = ""
        self._server: http.server.HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HttpStub:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                stub._serve(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server = server
        self.url = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True, name="http-stub")
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def count(self, route: str) -> int:
        """How many requests matched ``"METHOD /path"``."""
        method, _, path = route.partition(" ")
        return sum(1 for r in self.requests if r.method == method and r.path == path)

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("content-length") or 0)
        request = StubRequest(
            handler.command,
            parts.path,
            parse_qs(parts.query),
            {k.lower(): v for k, v in handler.headers.items()},
            handler.rfile.read(length),
        )
        self.requests.append(request)
        route = self.routes.get(f"{request.method} {request.path}")
        try:
            answer = route(request) if route else (404, {"error": f"no route for {request.method} {request.path}"})
        except Exception as exc:  # noqa: BLE001 - a failing route answers 500, as a failing service would
            answer = (500, {"error": f"{type(exc).__name__}: {exc}"})
        status, body, headers = answer if len(answer) == 3 else (*answer, {})
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        if isinstance(body, Iterator):
            handler.end_headers()
            for chunk in body:
                handler.wfile.write(chunk)
            return
        raw, content_type = _body(body)
        handler.send_header("content-type", content_type)
        handler.send_header("content-length", str(len(raw)))
        handler.end_headers()
        handler.wfile.write(raw)


class _QuietServer(http.server.HTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out and closed its socket is what some tests do on purpose.
        return None


# -- internals -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Item:
    """One Kafka record to deliver, before it has a partition and an offset."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class _AppSpec:
    app_class: type[App]
    app_id: str
    settings: Mapping[str, Any]

    @classmethod
    def resolve(cls, app: type[App] | str, app_id: str | None, settings: Mapping[str, Any]) -> _AppSpec:
        if isinstance(app, str):
            available = plugins.installed()
            if app not in available:
                raise PluginError(
                    f"no installed app has the id {app!r} (installed: {', '.join(available) or 'none'}); pass the App class instead"
                )
            return cls(plugins.load_class(available[app]), app_id or app, dict(settings))
        plugins.check_class(app, app_id or app.__name__)
        return cls(app, app_id or _default_id(app), dict(settings))

    def new_app(self) -> App:
        return plugins.instantiate(self.app_class, self.app_id, self.settings)

    def describe(self) -> str:
        return f"{self.app_class.__name__} (app {self.app_id!r})"


class _Lane:
    """One worker's share: its own store (connections), app instance and dispatcher, on one partition."""

    def __init__(self, store: Store, app: App, dispatcher: Dispatcher, fence: Fence, http: Http, url: str) -> None:
        self.store, self.app, self.dispatcher, self.fence, self.http, self.url = store, app, dispatcher, fence, http, url
        self.next_offset = 0

    @classmethod
    async def open(
        cls,
        spec: _AppSpec,
        url: str,
        partition: int,
        processing: ProcessingSettings,
        http_settings: HttpSettings,
        store_class: type[Store] = Store,
    ) -> _Lane:
        store = store_class.from_settings(PersistenceSettings(url=url))
        claims = await store.claim(GROUP, TOPIC, [partition], owner=f"worker.testing:{partition}:{uuid.uuid4().hex[:8]}")
        app = spec.new_app()
        http = Http(http_settings)
        dispatcher = Dispatcher([app], store, http, Topics(DEAD_LETTER_TOPIC, COMMANDS_TOPIC), processing)
        return cls(store, app, dispatcher, claims[partition].fence, http, url)

    async def run(self, items: Sequence[_Item], batch_size: int) -> Delivery:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        results: list[BatchResult] = []
        for start in range(0, len(items), batch_size):
            batch = []
            for item in items[start : start + batch_size]:
                batch.append(RawRecord(TOPIC, self.fence.partition, self.next_offset, 0, item.key, item.value, item.headers))
                self.next_offset += 1
            results.append(await self.dispatcher.dispatch(batch, self.fence))
        return Delivery(
            records=len(items),
            processed=sum(r.processed for r in results),
            duplicates=sum(r.duplicates for r in results),
            skipped=sum(r.skipped for r in results),
            dead_lettered=sum(r.dead_lettered for r in results),
            conflicts=sum(r.conflicts for r in results),
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.store.close()


class _RepeatingStore(Store):
    """Refuses the first commit of every batch, as a concurrent worker's change would, so every run is repeated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused: set[int | None] = set()

    async def commit(self, unit: UnitOfWork, fence: Fence | None = None, next_offset: int | None = None) -> Any:
        if next_offset not in self._refused:
            self._refused.add(next_offset)
            raise VersionConflict("worker.testing refuses the first commit of each batch, so that every handler run is repeated")
        return await super().commit(unit, fence, next_offset)


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


async def _scenario(spec: _AppSpec, deliveries: Sequence[Sequence[_Item]], store_class: type[Store] = Store) -> State:
    """A fresh database, one lane, the deliveries in order; the state at the end."""
    with tempfile.TemporaryDirectory(prefix="rc-worker-testing-") as directory:
        url = await _new_database(Path(directory) / "state.db")
        lane = await _Lane.open(spec, url, 0, TEST_PROCESSING, HttpSettings(), store_class)
        try:
            for items in deliveries:
                await lane.run(items, batch_size=1)
            return await _snapshot(lane.store, spec.app_id)
        finally:
            await lane.close()


async def _concurrent_scenario(spec: _AppSpec, shares: Sequence[Sequence[_Item]]) -> State:
    """A fresh database and one lane per share, all running at once; the state at the end."""
    with tempfile.TemporaryDirectory(prefix="rc-worker-testing-") as directory:
        url = await _new_database(Path(directory) / "state.db")
        lanes = [await _Lane.open(spec, url, n, TEST_PROCESSING, HttpSettings()) for n in range(len(shares))]
        try:
            async with asyncio.TaskGroup() as group:
                for lane, items in zip(lanes, shares, strict=True):
                    group.create_task(lane.run(items, batch_size=1))
            return await _snapshot(lanes[0].store, spec.app_id)
        finally:
            for lane in lanes:
                await lane.close()


async def _snapshot(store: Store, app_id: str) -> State:
    records = tuple(
        Record(r.id, decode_data(r.data), r.version, tuple(Association.parse(a) for a in r.associations))
        for r in await store.app_records(app_id)
    )
    outbox = [m for _, m in await store.outbox_messages()]
    commands = tuple(_command(m) for m in outbox if m.topic == COMMANDS_TOPIC and m.app_id == app_id)
    dead_letters = tuple(_dead_letter(m) for m in outbox if m.topic == DEAD_LETTER_TOPIC)
    return State(app_id, records, commands, dead_letters)


def _items(events: Events) -> list[_Item]:
    if isinstance(events, (str, bytes)):
        raise TypeError("events must be a list of messages or a pathlib.Path of a JSON-lines file, not a string")
    if isinstance(events, os.PathLike):
        from worker.dump import read_records_file  # the same parser as `rc-worker load`

        return [_Item(r.key, r.value, r.headers) for r in read_records_file(Path(events))]
    return [_item(n, event) for n, event in enumerate(events)]


def _item(number: int, event: Mapping[str, Any] | Message) -> _Item:
    if isinstance(event, Message):
        envelope = cloud_event(event.to_json())
    elif isinstance(event, Mapping):
        envelope = dict(event) if "specversion" in event else cloud_event(event)
    else:
        raise TypeError(f"event {number} is a {type(event).__name__}; give dicts (IMessage JSON or CloudEvents) or worker.Message objects")
    room = envelope.get("data", {}).get("room", {}) if isinstance(envelope.get("data"), Mapping) else {}
    key = room.get("id") if isinstance(room, Mapping) else None
    item = _Item(
        key.encode() if isinstance(key, str) else None,
        orjson.dumps(envelope),
        (("content-type", constants.STRUCTURED_CONTENT_TYPE.encode()),),
    )
    try:
        decode(RawRecord(TOPIC, 0, number, 0, item.key, item.value, item.headers))
    except DecodeError as exc:
        raise ValueError(f"event {number} is not a contract event: {exc.reason}; worker.testing.message() builds valid ones") from None
    return item


def _spread(items: Sequence[_Item], copies: int) -> list[list[_Item]]:
    """Events of one key to one copy, in order; keys dealt round-robin in order of first appearance."""
    lanes: list[list[_Item]] = [[] for _ in range(copies)]
    assigned: dict[bytes | None, int] = {}
    for item in items:
        lane = assigned.setdefault(item.key, len(assigned) % copies)
        lanes[lane].append(item)
    return lanes


def _default_id(app_class: type[App]) -> str:
    target = f"{app_class.__module__}:{app_class.__qualname__}"
    with contextlib.suppress(PluginError):
        for app_id, plugin in plugins.installed().items():
            if plugin.entry_point.value == target:
                return app_id
    return re.sub(r"(?<!^)(?=[A-Z])", "-", app_class.__name__).lower()


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


def _sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _timestamp(when: datetime) -> str:
    if when.tzinfo is None:
        raise ValueError("created_at must be an aware datetime, e.g. datetime(2026, 1, 1, tzinfo=UTC)")
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _body(body: Any) -> tuple[bytes, str]:
    if isinstance(body, bytes):
        return body, "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return orjson.dumps(body), "application/json"


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


__all__ = [
    "COMMANDS_TOPIC",
    "SOURCE",
    "TEST_PROCESSING",
    "Command",
    "DeadLetter",
    "Delivery",
    "Events",
    "Harness",
    "HttpStub",
    "State",
    "StubRequest",
    "assert_concurrency_safe",
    "assert_idempotent",
    "cloud_event",
    "message",
    "run",
]
