"""What the pages read on request: the database's pages of state, the re-drive, the topic explorer.

The database reads are ``worker.persistence.browse`` (paged, over indexes). The re-drive is
``worker.tools.dlq.redrive`` itself, to the records' original topics: the same ledger as
``rc-worker dlq redrive``, so no dead letter is ever sent twice, from the pages or the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from worker.config import KafkaSettings, Settings
from worker.errors import ConfigError, DecodeError
from worker.events import Event, RawRecord, decode
from worker.kafka import PartitionReader, topic_partitions
from worker.persistence.browse import (
    RecordsPage,
    app_ids,
    association_models,
    claims,
    outbox_backlog_by_topic,
    records_page,
)
from worker.persistence.store import Store
from worker.tools.common import CONNECT_TIMEOUT_S, parse_time
from worker.tools.dlq import DeadLetter, RedriveResult
from worker.tools.dlq import redrive as dlq_redrive
from worker.web.live import DeadLetterIndex

__all__ = [
    "Explored",
    "RecordsPage",
    "app_ids",
    "association_models",
    "chosen_for_redrive",
    "claims",
    "explore",
    "outbox_backlog_by_topic",
    "records_page",
    "redrive",
    "select_dead_letters",
]

# Fetches the explorer makes at most for one page of records.
MAX_FETCHES = 20


def select_dead_letters(letters: Sequence[DeadLetter], app: str | None, reason: str | None) -> list[DeadLetter]:
    """The dead letters of ``app`` (``(worker)`` for the worker's own) whose reason contains ``reason``."""
    return [
        d for d in letters if (app is None or (d.app or "(worker)") == app) and (reason is None or reason.casefold() in d.reason.casefold())
    ]


def chosen_for_redrive(index: DeadLetterIndex, fields: Mapping[str, str]) -> list[DeadLetter]:
    """One dead letter (``position`` = ``P/O``), or every one the ``app``/``reason`` filter selects."""
    position = fields.get("position", "")
    if position:
        partition, _, offset = position.partition("/")
        if not (partition.isdigit() and offset.isdigit()):
            raise ConfigError(f"position {position!r} is not PARTITION/OFFSET")
        found = index.find(int(partition), int(offset))
        return [found] if found is not None else []
    return select_dead_letters(index.of_app(fields.get("app") or None), None, fields.get("reason") or None)


async def redrive(settings: Settings, store: Store, letters: Sequence[DeadLetter], *, dry_run: bool) -> RedriveResult:
    """Send ``letters`` back to their original topics, each once (``rc-worker dlq redrive`` without --app)."""
    return await dlq_redrive(settings, store, letters, None, dry_run=dry_run)


@dataclass(frozen=True, slots=True)
class Decoded:
    """A record and what the worker makes of it: an event, or why it is invalid."""

    record: RawRecord
    event: Event | None
    invalid: str | None


@dataclass(frozen=True, slots=True)
class Explored:
    """A window of one partition."""

    partition: int
    partitions: list[int]
    first: int
    end: int
    start: int
    records: list[Decoded]


async def explore(kafka: KafkaSettings, partition: int, offset: int | None, time: str | None, count: int) -> Explored:
    """``count`` records of ``partition`` from the first at or after ``time``, else around ``offset``, else the last ones.

    Raises:
        ConfigError: the topic or partition does not exist, or the time is not ISO 8601.

    """
    partitions = await topic_partitions(kafka, kafka.topic, CONNECT_TIMEOUT_S)
    if partition not in partitions:
        raise ConfigError(f"topic {kafka.topic} has no partition {partition}; it has {len(partitions)}")
    async with PartitionReader(kafka, kafka.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
        first, end = (await reader.bounds([partition]))[partition]
        if time is not None:
            found = (await reader.offsets_for_time([partition], parse_time(time, "time")))[partition]
            start = end if found is None else found
        elif offset is not None:
            start = offset - count // 2
        else:
            start = end - count
        start = max(first, min(start, end))
        stop = min(end, start + count)
        records: list[RawRecord] = []
        if start < stop:
            reader.assign({partition: start})
            for _ in range(MAX_FETCHES):
                fetched = await reader.fetch_from([partition], kafka.fetch_timeout_ms, stop - start)
                records += [r for r in fetched.get(partition, []) if r.offset < stop]
                if await reader.position(partition) >= stop:
                    break
    return Explored(partition, partitions, first, end, start, [_decoded(r) for r in records])


def _decoded(record: RawRecord) -> Decoded:
    try:
        return Decoded(record, decode(record), None)
    except DecodeError as exc:
        return Decoded(record, None, exc.reason)
