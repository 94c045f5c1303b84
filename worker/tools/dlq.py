"""``rc-worker dlq``: list the dead-letter topic, and send chosen dead letters back through processing.

A dead letter is the original record (key, value, headers) with ``rc-dlq-*`` headers
appended by ``pipeline.dead_letters.dead_letter`` (why, at which stage, by which app, from where) and
the outbox's ``rc-outbox-id``. A redrive sends the original back, exactly as it was:
to the topic it came from, where every app that has not processed the event runs it (those
that have see a duplicate); or, with ``--app``, straight through that app into the
database as the worker would, the commands and new dead letters it stages published from
the outbox. Each dead letter is claimed in the database's redrive ledger (``dlq_redrives``)
before it is sent, so the same redrive run again sends nothing; one whose send failed is
sent by the next redrive. The ledger lives beside the state, not in a Kafka topic, because
the claim must be atomic among concurrent redrives and the state is what it protects.

A dead letter too large for its topic was published with its value cut short
(``rc-dlq-truncated``, see ``worker.pipeline.dead_letters``): it is never re-driven, since the cut value
would fail to decode or, worse, be processed as something it is not. Its whole record stays at
its original topic, partition and offset for as long as that topic retains it. Nothing goes
into the ledger for it: the header says so on every read, and a ledger row means "sent".

Sent back to its topic, an event older than ``persistence.processed_retention_hours`` may
have lost its processed-event markers to pruning: the apps that had processed it would then
count it again. Such a redrive is refused unless ``--force`` says that is intended (or
``--app`` sends it through the one app that failed it). Undecodable records never reached
an app, so their age does not matter.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
import structlog

from worker import constants
from worker.apps.contract import App
from worker.apps.http import Http
from worker.apps.readers import Directory
from worker.config import KafkaSettings, Settings
from worker.errors import ConfigError, PersistenceError, WorkerError
from worker.events import RawRecord
from worker.kafka import Outgoing, PartitionReader, Producer, Reader
from worker.persistence.admin import Redrive, claim_redrives, mark_sent, redrives
from worker.persistence.store import Store
from worker.pipeline.dispatch import Dispatcher, Topics
from worker.pipeline.outbox import OutboxPublisher
from worker.tools.common import CONNECT_TIMEOUT_S, Start, configured_store, plan, read_spans, require_topic
from worker.tools.progress import Progress

# Sent to their topics this many at a time, each chunk acknowledged before the progress moves on.
SEND_CHUNK = 1000
# The database claims under which `redrive --app` commits and publishes, apart from the live group.
REDRIVE_GROUP = "rc-worker:redrive"

log = structlog.get_logger("worker.dlq")


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One record of the dead-letter topic, and the original record it carries."""

    partition: int
    offset: int
    app: str | None
    stage: str
    reason: str
    original: RawRecord  # at its original topic, partition and offset; rc-dlq-* headers removed
    truncated: int | None = None  # the original value's size in bytes, if the value was cut short

    @property
    def position(self) -> tuple[int, int]:
        """Its (partition, offset) in the dead-letter topic."""
        return (self.partition, self.offset)

    def target(self, app: App | None) -> str:
        """Where a redrive sends it: ``app:<id>`` or ``topic:<original topic>``."""
        return f"app:{app.id}" if app is not None else f"topic:{self.original.topic}"


def parse(record: RawRecord, default_topic: str) -> DeadLetter:
    """The dead letter in ``record``; a record without rc-dlq-* headers is taken as it is."""

    def text(name: str) -> str | None:
        raw = record.header(name)
        return raw.decode("utf-8", "replace") if raw is not None else None

    def number(name: str) -> int | None:
        raw = text(name)
        return int(raw) if raw is not None and raw.lstrip("-").isdigit() else None

    # dead_letter() appends its headers after the record's own, and the outbox appends its
    # id after those: the original headers are everything before the last rc-dlq-reason.
    cut = max((i for i, (name, _) in enumerate(record.headers) if name == constants.DLQ_REASON), default=len(record.headers))
    original = RawRecord(
        topic=text(constants.DLQ_TOPIC) or default_topic,
        partition=number(constants.DLQ_PARTITION) or 0,
        offset=number(constants.DLQ_OFFSET) or 0,
        timestamp_ms=number(constants.DLQ_TIMESTAMP) or record.timestamp_ms,
        key=record.key,
        value=record.value,
        headers=record.headers[:cut],
    )
    return DeadLetter(
        record.partition,
        record.offset,
        text(constants.DLQ_APP),
        text(constants.DLQ_STAGE) or "?",
        text(constants.DLQ_REASON) or "",
        original,
        number(constants.DLQ_TRUNCATED),
    )


async def read_dead_letters(settings: KafkaSettings) -> list[DeadLetter]:
    """Every dead letter of ``settings.dead_letter_topic``, partition after partition, in offset order."""
    dlq = settings.model_copy(update={"topic": settings.dead_letter_topic})
    letters = []
    async with PartitionReader(dlq, dlq.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
        spans = await plan(dlq, reader, Start())
        sizes = {p: span.size for p, span in spans.items() if span.size}
        with Progress("dlq read", sum(sizes.values()), unit="dead letters", partitions=sizes) as progress:
            async for record in read_spans(reader, spans, dlq.fetch_timeout_ms, dlq.max_batch_records):
                letters.append(parse(record, settings.topic))
                progress.advance(1, partition=record.partition)
    return letters


def select(letters: Sequence[DeadLetter], app: str | None, reason: str | None) -> list[DeadLetter]:
    """The dead letters of ``app`` (if given) whose reason contains ``reason`` (if given)."""
    return [d for d in letters if (app is None or d.app == app) and (reason is None or reason in d.reason)]


@dataclass(frozen=True, slots=True)
class RedriveResult:
    """What a redrive sent, what it left because an earlier redrive had it, and what it left because it was cut short."""

    sent: list[DeadLetter]
    skipped: list[DeadLetter]
    truncated: list[DeadLetter]
    past_retention: list[DeadLetter] = field(default_factory=list)  # sent (or to be) only with force


class RedriveRefused(WorkerError):
    """Raised when a redrive to the topic would re-apply events older than the processed-marker retention, without ``--force``."""


def past_retention(settings: Settings, letters: Sequence[DeadLetter], now_ms: int | None = None) -> list[DeadLetter]:
    """The dead letters whose events apps may have processed before the oldest markers kept.

    The original record's timestamp bounds when any app processed it from below, so this
    errs towards warning. Markers kept for ever (retention 0) never lapse.
    """
    hours = settings.persistence.processed_retention_hours
    if hours == 0:
        return []
    cutoff = (now_ms if now_ms is not None else int(time.time() * 1000)) - hours * 3_600_000
    return [d for d in letters if d.stage != "decode" and d.original.timestamp_ms < cutoff]


async def redrive(
    settings: Settings, store: Store, letters: Sequence[DeadLetter], app: App | None, *, dry_run: bool = False, force: bool = False
) -> RedriveResult:
    """Send ``letters`` back (to their topics, or through ``app``), each at most once.

    Raises:
        RedriveRefused: sending to the topics would re-apply events older than the marker
            retention, and ``force`` is not set; nothing was sent.
        BrokerError, PersistenceError: nothing was sent, or what was is recorded.
        FencedError: another ``redrive --app`` took over meanwhile; run it again.

    """
    dlq_topic = settings.kafka.dead_letter_topic
    truncated = [d for d in letters if d.truncated is not None]
    for letter in truncated:
        origin = letter.original
        log.warning(
            "dlq_redrive_skipped",
            topic=dlq_topic,
            partition=letter.partition,
            offset=letter.offset,
            reason="value_truncated",
            original_value_bytes=letter.truncated,
            original_topic=origin.topic,
            original_partition=origin.partition,
            original_offset=origin.offset,
        )
    letters = [d for d in letters if d.truncated is None]
    ledger = await redrives(store, dlq_topic)
    fresh = [d for d in letters if d.position not in ledger]
    # Claimed by an earlier run whose send failed: the same target may have them now.
    unsent = [d for d in letters if _unsent(ledger.get(d.position), d.target(app))]
    skipped = [d for d in letters if d.position in ledger and d not in unsent]
    stale = past_retention(settings, [*fresh, *unsent]) if app is None else []
    _check_retention(settings, stale, dry_run=dry_run, force=force)
    if dry_run:
        return RedriveResult([*fresh, *unsent], skipped, truncated, stale)
    claimed = await claim_redrives(store, dlq_topic, {d.position: d.target(app) for d in fresh})
    chosen = [*(d for d in fresh if d.position in claimed), *unsent]
    skipped += [d for d in fresh if d.position not in claimed]
    with Progress("dlq redrive", len(chosen), unit="dead letters") as progress:
        if app is None:
            await _to_topics(settings.kafka, chosen, progress)
        else:
            await _through_app(settings, store, app, chosen, progress)
    await mark_sent(store, dlq_topic, [d.position for d in chosen])
    return RedriveResult(chosen, skipped, truncated, stale)


def _check_retention(settings: Settings, stale: Sequence[DeadLetter], *, dry_run: bool, force: bool) -> None:
    hours = settings.persistence.processed_retention_hours
    for letter in stale:
        origin = letter.original
        log.warning(
            "dlq_redrive_past_retention",
            partition=letter.partition,
            offset=letter.offset,
            original_topic=origin.topic,
            original_partition=origin.partition,
            original_offset=origin.offset,
            original_timestamp_ms=origin.timestamp_ms,
            retention_hours=hours,
            forced=force,
        )
    if stale and not force and not dry_run:
        first = ", ".join(f"{d.partition}/{d.offset}" for d in stale[:5])
        raise RedriveRefused(
            f"{len(stale)} dead letter(s) ({first}{', ...' if len(stale) > 5 else ''}) hold events older than "
            f"persistence.processed_retention_hours ({hours} h): their processed markers may be pruned, so apps that "
            "processed them would count them again; nothing was sent. Redrive them with --app through the app that "
            "failed them, or pass --force to send them to their topic anyway"
        )


def _unsent(entry: Redrive | None, target: str) -> bool:
    return entry is not None and entry.sent_at is None and entry.target == target


async def _to_topics(settings: KafkaSettings, letters: Sequence[DeadLetter], progress: Progress) -> None:
    if not letters:
        return
    async with Producer(settings) as producer:
        for first in range(0, len(letters), SEND_CHUNK):
            chunk = letters[first : first + SEND_CHUNK]
            await producer.send_many(
                [Outgoing(d.original.topic, d.original.key, d.original.value or b"", d.original.headers) for d in chunk]
            )
            progress.advance(len(chunk))


async def _through_app(settings: Settings, store: Store, app: App, letters: Sequence[DeadLetter], progress: Progress) -> None:
    """Dispatch the originals through ``app`` under redrive claims, then publish what they staged."""
    if not letters:
        return
    by_origin: dict[tuple[str, int], list[RawRecord]] = defaultdict(list)
    for letter in letters:
        by_origin[(letter.original.topic, letter.original.partition)].append(letter.original)
    kafka = settings.kafka
    http = Http(settings.http)
    directory = Directory.from_settings(settings.rocketchat)
    dispatcher = Dispatcher(
        [app], store, http, Topics(kafka.dead_letter_topic, kafka.commands_topic), settings.processing, directory=directory
    )
    owner = f"{socket.gethostname()}:{os.getpid()}:redrive"
    try:
        async with Producer(kafka) as producer, Reader(kafka) as reader:
            publisher = OutboxPublisher(store, producer, reader)
            for (topic, partition), records in sorted(by_origin.items()):
                # A topic name of the redrive's own: the live owner of the partition must not
                # publish these rows too, and the next redrive publishes what a crash left.
                claims = await store.claim(REDRIVE_GROUP, f"redrive:{topic}", [partition], owner)
                fence = claims[partition].fence
                await publisher.publish(fence)
                result = await dispatcher.dispatch(sorted(records, key=lambda r: r.offset), fence)
                await publisher.publish(fence)
                progress.advance(len(records), dead_letters=result.dead_letters, duplicates=result.duplicates)
    finally:
        await http.aclose()
        await directory.aclose()


# -- commands ------------------------------------------------------------------------------


def _line(letter: DeadLetter, entry: Redrive | None) -> str:
    origin = letter.original
    status = "-" if entry is None else (f"redriven to {entry.target}" if entry.sent_at else f"claimed for {entry.target}, not sent")
    fields = [
        f"{letter.partition}/{letter.offset}",
        f"{origin.topic}/{origin.partition}/{origin.offset}",
        letter.app or "-",
        letter.stage,
        letter.reason,
        status,
        f"truncated from {letter.truncated} bytes" if letter.truncated is not None else "-",
    ]
    return "\t".join(field.replace("\t", " ").replace("\n", " ") for field in fields)


def _as_json(letter: DeadLetter, entry: Redrive | None) -> str:
    origin = letter.original
    item = {
        "partition": letter.partition,
        "offset": letter.offset,
        "topic": origin.topic,
        "original_partition": origin.partition,
        "original_offset": origin.offset,
        "app": letter.app,
        "stage": letter.stage,
        "reason": letter.reason,
        "redriven_to": entry.target if entry and entry.sent_at else None,
        "truncated_from_bytes": letter.truncated,
    }
    return orjson.dumps(item).decode()


def _required_store(settings: Settings) -> Store:
    store = configured_store(settings)
    if store is None:
        raise ConfigError(
            f"the redrive ledger lives in the state database ({_url(settings)}), which does not exist; "
            "point persistence.url (RC_WORKER_PERSISTENCE__URL) at the worker's database"
        )
    return store


async def _ledger_if_any(settings: Settings) -> dict[tuple[int, int], Redrive]:
    """The redrive ledger, or nothing if the state database is missing, behind, or down (listing goes on)."""
    store = configured_store(settings)
    if store is None:
        return {}
    try:
        await store.check_schema()
        return await redrives(store, settings.kafka.dead_letter_topic)
    except PersistenceError as exc:
        print(f"rc-worker: redrive status unknown: {exc}", file=sys.stderr)
        return {}
    finally:
        await store.close()


def _url(settings: Settings) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.persistence.url.get_secret_value()).render_as_string(hide_password=True)


async def list_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker dlq list``: one line per dead letter (tab-separated, or JSON with --json)."""
    letters = select(await read_dead_letters(settings.kafka), args.app, args.reason)
    ledger = await _ledger_if_any(settings)
    for letter in letters:
        entry = ledger.get(letter.position)
        print(_as_json(letter, entry) if args.json else _line(letter, entry))
    return 0


async def redrive_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker dlq redrive``."""
    from worker.plugins import load_apps

    app = load_apps([args.app], settings.handlers.settings)[0] if args.app else None
    letters = select(await read_dead_letters(settings.kafka), args.app, args.reason)
    if not args.dry_run:
        kafka = settings.kafka
        # Through an app, what it stages goes out from the outbox to the commands and dead-letter topics.
        targets = {kafka.commands_topic, kafka.dead_letter_topic} if app is not None else {d.original.topic for d in letters}
        for topic in sorted(targets):
            await require_topic(kafka, topic, create=None)
    store = _required_store(settings)
    try:
        await store.check_schema()
        result = await redrive(settings, store, letters, app, dry_run=args.dry_run, force=args.force)
    finally:
        await store.close()
    verb = "would send" if args.dry_run else "sent"
    for letter in result.sent:
        origin = letter.original
        where = f"app {app.id}" if app is not None else f"topic {origin.topic}"
        print(f"{verb} dead letter {letter.partition}/{letter.offset} (from {origin.topic}/{origin.partition}/{origin.offset}) to {where}")
    for letter in result.truncated:
        origin = letter.original
        print(
            f"{'would skip' if args.dry_run else 'skipped'} dead letter {letter.partition}/{letter.offset} (from {origin.topic}/{origin.partition}/{origin.offset}): "
            f"its value was cut short from {letter.truncated} bytes"
        )
    if result.past_retention:
        print(
            f"{'would need' if args.dry_run and not args.force else 'sent with'} --force: {len(result.past_retention)} dead letters of "
            f"events older than persistence.processed_retention_hours; apps that processed them may count them again"
        )
    target = f"app {app.id}" if app is not None else "their topics"
    summary = f"{verb} {len(result.sent)} dead letters to {target}; {len(result.skipped)} already re-driven, left alone"
    if result.truncated:
        summary += (
            f"; {len(result.truncated)} cut short to fit the dead-letter topic, not sent: each whole record is still at "
            "the topic/partition/offset it came from (shown above; its rc-dlq-topic/-partition/-offset headers) "
            "while that topic retains it, to be re-sent from there"
        )
    print(summary)
    return 0
