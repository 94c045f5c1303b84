"""Fuzzing the way in: arbitrary bytes and mutated contract events never crash the worker.

``decode`` may only ever raise DecodeError, with a reason; and a batch of such records run
through the Dispatcher (in-process, on a SQLite store) commits with every record either
processed, skipped (not a PostMessageSent) or dead-lettered with a reason.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handlers.message_count import MessageCount
from tests.support import FIXTURES
from worker import constants
from worker.apps.contract import App
from worker.apps.http import Http
from worker.config import HttpSettings, PersistenceSettings, ProcessingSettings
from worker.errors import DecodeError
from worker.events import Event, Message, RawRecord, decode
from worker.persistence.store import Fence, Store
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.plugins import instantiate

VALID = [json.loads(line) for line in (FIXTURES / "valid.jsonl").read_text().splitlines() if line.strip()]
TOPIC = "fuzz"

# -- strategies ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
header_names = st.sampled_from(["content-type", "ce_specversion", "ce_type", "ce_source", "ce_id", "ce_time", "traceparent"]) | st.text(
    max_size=16
)
header_values = st.binary(max_size=40) | st.sampled_from(
    [b"1.0", b"0.3", constants.POST_MESSAGE_SENT.encode(), b"application/json", b"application/cloudevents+json", b"\xff\xfe"]
)
headers = st.lists(st.tuples(header_names, header_values), max_size=6).map(tuple)


@st.composite
def arbitrary_records(draw: st.DrawFn) -> RawRecord:
    """Any bytes (or none) with any headers."""
    value = draw(st.none() | st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
    return RawRecord(TOPIC, 0, 0, 0, draw(st.none() | st.binary(max_size=12)), value, draw(headers))


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside a JSON document."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield (*prefix, index)
            yield from _paths(child, (*prefix, index))


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


@st.composite
def mutated_records(draw: st.DrawFn) -> RawRecord:
    """A valid contract record with fields dropped or retyped, its bytes cut, or its headers changed."""
    line = draw(st.sampled_from(VALID))
    document = json.loads(line["value"])
    record_headers = [(k, v.encode()) for k, v in line["headers"].items()]
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(document))
        kind = draw(st.sampled_from(["drop", "retype", "add"])) if paths else "add"
        if kind == "add" or not paths:
            if isinstance(document, dict):
                document[draw(st.text(max_size=12))] = draw(json_values)
            continue
        path = draw(st.sampled_from(paths))
        parent = _parent(document, path)
        if kind == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    value = json.dumps(document).encode()
    if draw(st.booleans()):
        value = value[: draw(st.integers(0, len(value)))]
    if draw(st.booleans()):
        record_headers = _mutate_headers(draw, record_headers)
    return RawRecord(TOPIC, 0, 0, 0, line["key"].encode(), value, tuple(record_headers))


def _mutate_headers(draw: st.DrawFn, found: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    how = draw(st.sampled_from(["replace", "extend", "drop"]))
    if how == "replace":
        return list(draw(headers))
    if how == "extend":
        return [*found, *draw(headers)]
    return [h for h in found if not draw(st.booleans())]


@st.composite
def nested_records(draw: st.DrawFn) -> RawRecord:
    """A valid event whose customFields nest around the depth limit, as arrays or objects."""
    line = draw(st.sampled_from([line for line in VALID if "ce_specversion" not in line["headers"]]))
    document = json.loads(line["value"])
    nested: Any = draw(json_values)
    for _ in range(draw(st.integers(constants.MAX_JSON_DEPTH - 8, constants.MAX_JSON_DEPTH + 4))):
        nested = [nested] if draw(st.booleans()) else {draw(st.text(max_size=3)): nested}
    document["data"]["customFields"] = {"deep": nested}
    return RawRecord(TOPIC, 0, 0, 0, None, json.dumps(document).encode(), ())


records = arbitrary_records() | mutated_records() | nested_records()
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# -- decode ------------------------------------------------------------------------------------


def _decoded(record: RawRecord) -> Event | DecodeError:
    try:
        return decode(record)
    except DecodeError as exc:
        return exc


class TestDecodeFuzz:
    """decode raises DecodeError with a reason, or returns an event handlers can use."""

    @FUZZ
    @given(record=records)
    def test_decode_raises_only_decode_error_with_a_reason(self, record: RawRecord) -> None:
        """Whatever the bytes and headers, the outcome is an Event or a DecodeError naming why."""
        outcome = _decoded(record)
        if isinstance(outcome, DecodeError):
            assert isinstance(outcome.reason, str)
            assert outcome.reason.strip()
            return
        assert outcome.record is record
        if outcome.message is not None:
            # What a handler may do with any message that passed: read it and serialise it.
            assert Message.model_validate(outcome.message.to_json()) == outcome.message

    @settings(max_examples=100, deadline=None, database=None)
    @given(line=st.sampled_from(VALID), cut=st.integers(1, 10_000))
    def test_truncated_valid_events_are_refused(self, line: dict[str, Any], cut: int) -> None:
        """A valid event cut short anywhere is not JSON any more, and is refused as such."""
        value = line["value"].encode()
        value = value[: max(0, len(value) - cut)]
        outcome = _decoded(RawRecord(TOPIC, 0, 0, 0, None, value, tuple((k, v.encode()) for k, v in line["headers"].items())))
        assert isinstance(outcome, DecodeError)


# -- the dispatcher ------------------------------------------------------------------------------


class Inspector(App):
    """Reads every field a handler might, and serialises the message, without writing anything."""

    async def execute_post_message_sent(self, message: Message, read: Any, http: Any, persistence: Any, modify: Any) -> None:
        json.dumps(message.to_json())
        assert message.room.id
        assert message.sender.id
        assert message.created_at.tzinfo is not None


@dataclass
class Harness:
    """A dispatcher on a SQLite store, with its own event loop (hypothesis drives sync tests)."""

    loop: asyncio.AbstractEventLoop
    store: Store
    dispatcher: Dispatcher
    fence: Fence
    next_offset: int = 0

    def run(self, batch: list[RawRecord]) -> tuple[Any, list[Any]]:
        records = []
        for record in batch:
            records.append(RawRecord(TOPIC, 0, self.next_offset, 1_700_000_000_000, record.key, record.value, record.headers))
            self.next_offset += 1
        return self.loop.run_until_complete(self._dispatch(records))

    async def _dispatch(self, records: list[RawRecord]) -> tuple[Any, list[Any]]:
        result = await self.dispatcher.dispatch(records, self.fence)
        pending = await self.store.pending_outbox(TOPIC, 0, 1000)
        if pending:
            await self.store.mark_published([p.id for p in pending])
        return result, pending


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A migrated SQLite store and a dispatcher running message-count and an inspector."""
    loop = asyncio.new_event_loop()
    path: Path = tmp_path_factory.mktemp("fuzz") / "state.db"
    store = Store.from_settings(PersistenceSettings(url=f"sqlite+aiosqlite:///{path}"))  # type: ignore[arg-type]
    http = Http(HttpSettings())
    apps = [instantiate(MessageCount, "message-count", {}), instantiate(Inspector, "inspector", {})]
    processing = ProcessingSettings(handler_max_attempts=1, backoff_initial_ms=0, backoff_max_ms=0)
    dispatcher = Dispatcher(apps, store, http, Topics(f"{TOPIC}.dlq", f"{TOPIC}.cmd"), processing)
    loop.run_until_complete(store.upgrade())
    claims = loop.run_until_complete(store.claim("fuzz-group", TOPIC, [0], "fuzz"))
    try:
        yield Harness(loop, store, dispatcher, claims[0].fence)
    finally:
        loop.run_until_complete(http.aclose())
        loop.run_until_complete(store.close())
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class TestDispatchFuzz:
    """Through the dispatcher, every record is processed, skipped or dead-lettered; none crashes it."""

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(batch=st.lists(records | st.sampled_from(VALID).map(lambda line: _line_record(line)), min_size=1, max_size=6))
    def test_each_record_is_processed_or_dead_lettered_with_a_reason(self, harness: Harness, batch: list[RawRecord]) -> None:
        """The batch commits; dead letters are exactly the undecodable records, each with its reason."""
        refused = {n: outcome.reason for n, record in enumerate(batch) if isinstance(outcome := _decoded(record), DecodeError)}
        first = harness.next_offset
        result, pending = harness.run(batch)

        assert result.next_offset == harness.next_offset
        assert result.processed + result.skipped + result.dead_lettered == len(batch)
        assert result.dead_lettered == len(refused)
        # Apps never fail on a decoded event, so every dead letter is a decode refusal.
        letters = {int(dict(p.message.headers)[constants.DLQ_OFFSET]) - first: p.message for p in pending}
        assert letters.keys() == refused.keys()
        for n, letter in letters.items():
            found = dict(letter.headers)
            assert found[constants.DLQ_STAGE] == b"decode"
            assert found[constants.DLQ_REASON] == refused[n].encode()[:2000]
            assert letter.value == (batch[n].value or b"")


def _line_record(line: dict[str, Any]) -> RawRecord:
    value = base64.b64decode(line["value_b64"]) if "value_b64" in line else line["value"].encode()
    return RawRecord(TOPIC, 0, 0, 0, line["key"].encode(), value, tuple((k, v.encode()) for k, v in line["headers"].items()))
