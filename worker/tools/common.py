"""The data tools' shared parts: their arguments, the range of a topic they cover, their entry points.

``rc-worker replay``, ``dump``, ``dlq`` and ``offsets`` read a topic between two points
(the beginning, partition offsets, or times) without joining the live consumer group. This
module turns their arguments into per-partition offset spans, refusing what cannot be meant
(a partition the topic lacks, an offset outside the log, an empty range) before anything is
written. The entry points import their implementation only when run, so ``rc-worker run``
pays nothing for them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from worker.config import KafkaSettings, Settings
from worker.errors import ConfigError
from worker.pipeline.stall import Stall

if TYPE_CHECKING:
    from worker.events import RawRecord
    from worker.kafka import PartitionReader
    from worker.persistence.store import Store

# An operator's command waits at most this long for the broker before it gives up.
CONNECT_TIMEOUT_S = 10.0
# A range whose partition stops advancing this long before its end has lost its broker.
STALL_TIMEOUT_S = 60.0


def parse_time(text: str, flag: str) -> int:
    """Milliseconds since the epoch of an ISO 8601 time (UTC when it names no offset)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not an ISO 8601 time; write e.g. 2026-11-29T10:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def format_time(timestamp_ms: int) -> str:
    """An epoch-milliseconds time as ISO 8601 UTC, as the commands accept it."""
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_offsets(text: str, flag: str) -> dict[int, int]:
    """``P:O[,P:O...]`` as {partition: offset}."""
    offsets: dict[int, int] = {}
    for item in text.split(","):
        partition, sep, offset = item.strip().partition(":")
        if not (sep and partition.isdigit() and offset.isdigit()):
            raise ConfigError(f"{flag} {text!r}: {item.strip()!r} is not PARTITION:OFFSET; write e.g. 0:120,3:75")
        if int(partition) in offsets:
            raise ConfigError(f"{flag} {text!r} names partition {partition} twice")
        offsets[int(partition)] = int(offset)
    return offsets


def parse_names(text: str, flag: str) -> list[str]:
    """``a,b`` as a list of names, in order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"{flag} needs at least one name, e.g. {flag} message-count")
    return names


@dataclass(frozen=True, slots=True)
class Start:
    """Where a range begins: at the beginning (neither field), at given offsets, or at a time."""

    offsets: dict[int, int] | None = None
    time_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Span:
    """The offsets ``start`` up to (not including) ``end`` of one partition."""

    start: int
    end: int

    @property
    def size(self) -> int:
        """How many offsets the span covers."""
        return max(0, self.end - self.start)


async def plan(
    settings: KafkaSettings,
    reader: PartitionReader,
    start: Start,
    to_time_ms: int | None = None,
    partitions: Sequence[int] | None = None,
) -> dict[int, Span]:
    """The span of each chosen partition (``partitions``, those of ``start.offsets``, else all).

    The end is the log end as it is now, or the first offset at or after ``to_time_ms``.

    Raises:
        ConfigError: the topic or a partition does not exist, an offset is outside its
            partition's log, or the times are in the wrong order.

    """
    from worker.kafka import topic_partitions

    topic = reader.topic
    existing = await topic_partitions(settings, topic, CONNECT_TIMEOUT_S)
    if not existing:
        raise ConfigError(
            f"topic {topic} does not exist on {settings.bootstrap_servers}; check its name (--topic, kafka.topic, "
            "kafka.dead_letter_topic) or create it with `rc-worker topics create`"
        )
    chosen = sorted(partitions if partitions is not None else start.offsets or existing)
    missing = [p for p in chosen if p not in existing]
    if missing:
        raise ConfigError(f"partition {missing[0]} does not exist: topic {topic} has partitions {existing[0]}..{existing[-1]}")
    if start.time_ms is not None and to_time_ms is not None and to_time_ms <= start.time_ms:
        raise ConfigError(f"--to-time {format_time(to_time_ms)} is not after the start {format_time(start.time_ms)}")
    bounds = await reader.bounds(chosen)
    starts = {p: first for p, (first, _) in bounds.items()}
    if start.offsets is not None:
        for partition, offset in start.offsets.items():
            first, end = bounds[partition]
            if not first <= offset <= end:
                raise ConfigError(
                    f"offset {offset} of {topic}[{partition}] is outside its log: the partition holds offsets {first}..{end - 1}"
                )
            starts[partition] = offset
    elif start.time_ms is not None:
        starts = _or_end(await reader.offsets_for_time(chosen, start.time_ms), bounds)
    ends = {p: end for p, (_, end) in bounds.items()}
    if to_time_ms is not None:
        ends = _or_end(await reader.offsets_for_time(chosen, to_time_ms), bounds)
    return {p: Span(starts[p], max(starts[p], ends[p])) for p in chosen}


def _or_end(found: dict[int, int | None], bounds: dict[int, tuple[int, int]]) -> dict[int, int]:
    # No record at or after the time: the partition's range starts (or ends) at its end.
    return {p: bounds[p][1] if offset is None else offset for p, offset in found.items()}


def require_records(spans: dict[int, Span], topic: str, start: Start, to_time_ms: int | None) -> None:
    """Raise ConfigError when the spans hold no record at all."""
    if any(span.size for span in spans.values()):
        return
    if start.time_ms is not None or to_time_ms is not None:
        since = format_time(start.time_ms) if start.time_ms is not None else "the beginning"
        until = format_time(to_time_ms) if to_time_ms is not None else "now"
        where = f"between {since} and {until}"
    elif start.offsets is not None:
        where = "from " + ",".join(f"{p}:{o}" for p, o in sorted(start.offsets.items()))
    else:
        where = "at all"
    raise ConfigError(f"topic {topic} has no records {where} in partitions {sorted(spans)}; nothing was written")


async def require_topic(settings: KafkaSettings, topic: str, *, create: bool | None = False, partitions: int = 6) -> None:
    """Make sure ``topic`` exists before anything is written to it, creating it if asked.

    Without the check a producer waits its whole request timeout for a topic that is not
    there; this fails at once, with the command that creates it.

    ``create`` None: the command has no ``--create-topic`` to offer.

    Raises:
        ConfigError: the topic does not exist and ``create`` is not true.
        BrokerError: Kafka cannot be reached.

    """
    from worker.kafka import create_topics, topic_partitions

    if await topic_partitions(settings, topic, CONNECT_TIMEOUT_S):
        return
    # `topics create` makes the configured event topic with its dead-letter and commands topics.
    command = "rc-worker topics create" if topic == settings.topic else f"RC_WORKER_KAFKA__TOPIC={topic} rc-worker topics create"
    if not create:
        offer = "" if create is None else ", or run again with --create-topic"
        raise ConfigError(
            f"topic {topic} does not exist on {settings.bootstrap_servers}; nothing was sent. "
            f"Create it with `{command}` (add --partitions N for other than 6){offer}"
        )
    for name in await create_topics(settings.model_copy(update={"topic": topic}), partitions):
        print(f"created {name}", file=sys.stderr)


def start_from_args(args: argparse.Namespace) -> Start:
    """The start of the range a command's ``--from-*`` arguments name."""
    if getattr(args, "from_offset", None):
        return Start(offsets=parse_offsets(args.from_offset, "--from-offset"))
    if getattr(args, "from_time", None):
        return Start(time_ms=parse_time(args.from_time, "--from-time"))
    return Start()


async def read_spans(reader: PartitionReader, spans: dict[int, Span], fetch_timeout_ms: int, max_records: int) -> AsyncIterator[RawRecord]:
    """The records of each span, partition after partition, each in offset order.

    Raises:
        BrokerError: a partition stopped advancing for STALL_TIMEOUT_S before its end.

    """
    from worker.errors import BrokerError

    for partition, span in spans.items():
        if not span.size:
            continue
        reader.assign({partition: span.start})
        position, stall = span.start, Stall(STALL_TIMEOUT_S)
        while position < span.end:
            fetched = await reader.fetch_from([partition], fetch_timeout_ms, max_records)
            for record in fetched.get(partition, []):
                if record.offset < span.end:
                    yield record
            moved = await reader.position(partition)
            if moved > position:
                stall.moved()
            elif stall.stalled():
                raise BrokerError(
                    f"{reader.topic}[{partition}] stayed at offset {position} for {STALL_TIMEOUT_S:g}s before its end {span.end}; "
                    "is the broker healthy, or were records deleted meanwhile?"
                )
            position = moved


def state_store(url: str) -> Store:
    """A store for a database URL given on the command line."""
    from pydantic import ValidationError

    from worker.config import PersistenceSettings
    from worker.persistence.store import Store

    try:
        settings = PersistenceSettings.model_validate({"url": url})
    except ValidationError as exc:
        raise ConfigError(f"--state {url!r}: {exc.errors()[0]['msg']}") from None
    return Store.from_settings(settings)


def configured_store(settings: Settings) -> Store | None:
    """The configured state database, or None when it is a SQLite file that does not exist (yet)."""
    from sqlalchemy.engine import make_url

    from worker.persistence.store import Store

    url = make_url(settings.persistence.url.get_secret_value())
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" and not Path(url.database).exists():
        return None
    return Store.from_settings(settings.persistence)
