"""What the status pages show without asking anyone at request time: a background task's samples.

Every ``web.sample_interval_s`` one task reads the topic's offsets and the group's committed
ones, describes the consumer group, asks each running worker for its status (the URL each
registered in ``worker_members``), tails the dead-letter topic into an index in memory, and
notes which dead letters the redrive ledger has claimed.
Pages render from the latest sample, so they answer in milliseconds and no page waits for a
broker; the events/s chart is the difference between samples over the last 15 minutes, so it
needs no Prometheus.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import structlog

from worker.config import KafkaSettings, Settings
from worker.errors import WorkerError
from worker.kafka import GroupMember, PartitionReader, describe_group_members, group_offsets, topic_partitions
from worker.persistence import browse
from worker.persistence import members as member_rows
from worker.persistence.store import Store
from worker.tools.common import CONNECT_TIMEOUT_S, Span, read_spans
from worker.tools.dlq import DeadLetter, parse
from worker.tools.offsets import PartitionOffsets

log = structlog.get_logger("worker.web")

# The chart's window.
RATE_WINDOW_S = 15 * 60
# A member's status request may take this long before the member counts as not answering.
STATUS_TIMEOUT_S = 2.0
# The dead letters kept in memory, newest first; older ones are still in the topic (`rc-worker dlq list`).
MAX_DEAD_LETTERS = 200_000


@dataclass(frozen=True, slots=True)
class MemberView:
    """One member of the group: what Kafka says, what its row says, what it answered."""

    kafka: GroupMember | None
    row: member_rows.Member | None
    status: dict[str, Any] | None  # its /status JSON; None if it did not answer
    error: str | None = None  # why it did not

    @property
    def name(self) -> str:
        """Its worker name, else its Kafka client id."""
        if self.row is not None:
            return self.row.member
        return f"{self.kafka.client_id} ({self.kafka.member_id})" if self.kafka is not None else "?"

    @property
    def host(self) -> str:
        """The host as Kafka sees it, else as the worker said."""
        return self.kafka.host if self.kafka is not None else (self.row.host if self.row is not None else "?")

    @property
    def partitions(self) -> tuple[int, ...]:
        """Its partitions of the topic, as assigned by the group."""
        return self.kafka.partitions if self.kafka is not None else ()

    def lane(self, partition: int) -> dict[str, Any] | None:
        """Its lane's status for ``partition``, if it reported one."""
        for lane in (self.status or {}).get("partitions", []):
            if lane.get("partition") == partition:
                return dict(lane)
        return None


@dataclass(frozen=True, slots=True)
class Sample:
    """One round of sampling."""

    at: datetime
    offsets: list[PartitionOffsets] = field(default_factory=list)
    group_state: str = "?"
    members: list[MemberView] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # what could not be read this round

    def member_of(self, partition: int) -> MemberView | None:
        """The member the group assigned ``partition`` to."""
        return next((m for m in self.members if partition in m.partitions), None)

    @property
    def total_lag(self) -> int:
        """Records behind over all partitions."""
        return sum(row.lag for row in self.offsets)


class DeadLetterIndex:
    """The dead-letter topic in memory, tailed: each refresh reads only what is new.

    What the pages look up per request (a position, an app's letters, the counts per app and
    reason) is indexed once per refresh, so a request costs the page it shows, not the topic.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka.model_copy(update={"topic": kafka.dead_letter_topic})
        self._default_topic = kafka.topic
        self._next: dict[int, int] = {}
        self._letters: list[DeadLetter] = []
        self._newest_first: list[DeadLetter] = []
        self._by_position: dict[tuple[int, int], DeadLetter] = {}
        self._by_app: dict[str, list[DeadLetter]] = {}
        self._reasons: Counter[str] = Counter()
        self.spans: dict[int, tuple[int, int]] = {}  # per partition, the first and last offset held: the ledger is read there
        self.lock = asyncio.Lock()

    @property
    def newest_first(self) -> list[DeadLetter]:
        """Every dead letter held, newest first."""
        return self._newest_first

    @newest_first.setter
    def newest_first(self, letters: Sequence[DeadLetter]) -> None:
        self._letters = list(letters)[::-1]
        self._reindex()

    def _reindex(self) -> None:
        self._newest_first = self._letters[::-1]
        self._by_position = {d.position: d for d in self._letters}
        by_app: dict[str, list[DeadLetter]] = {}
        for letter in self._newest_first:
            by_app.setdefault(letter.app or "(worker)", []).append(letter)
        self._by_app = by_app
        self._reasons = Counter(d.reason for d in self._letters)
        spans: dict[int, tuple[int, int]] = {}
        for letter in self._letters:
            first, last = spans.get(letter.partition, (letter.offset, letter.offset))
            spans[letter.partition] = (min(first, letter.offset), max(last, letter.offset))
        self.spans = spans

    async def refresh(self) -> None:
        """Read the records added since the last refresh."""
        async with self.lock:
            topic = self._kafka.topic
            partitions = await topic_partitions(self._kafka, topic, CONNECT_TIMEOUT_S)
            if not partitions:
                return
            async with PartitionReader(self._kafka, topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
                bounds = await reader.bounds(partitions)
                spans = {p: Span(max(first, self._next.get(p, first)), end) for p, (first, end) in bounds.items()}
                if not any(span.size for span in spans.values()):
                    return
                async for record in read_spans(reader, spans, self._kafka.fetch_timeout_ms, self._kafka.max_batch_records):
                    self._letters.append(parse(record, self._default_topic))
            self._next.update({p: span.end for p, span in spans.items()})
            self._letters = sorted(self._letters, key=lambda d: (d.original.timestamp_ms, d.partition, d.offset))[-MAX_DEAD_LETTERS:]
            self._reindex()

    def find(self, partition: int, offset: int) -> DeadLetter | None:
        """The dead letter at ``partition``/``offset`` of the dead-letter topic."""
        return self._by_position.get((partition, offset))

    def of_app(self, app: str | None) -> list[DeadLetter]:
        """The dead letters of ``app`` (``(worker)`` for the worker's own), newest first; every one for None."""
        return self._newest_first if app is None else self._by_app.get(app, [])

    def counts(self, key: str) -> Counter[str]:
        """How many dead letters there are per ``reason`` or per ``app``."""
        if key == "app":
            return Counter({app: len(letters) for app, letters in self._by_app.items()})
        return self._reasons


class RedriveLedger:
    """Which of the dead letters held the redrive ledger has claimed, as of the last sample.

    The pages count the dead letters not re-driven yet from this set. The ledger only grows
    (rows are added, then stamped once sent) and keeps the rows of letters the topic has long
    dropped: only its primary-key ranges between the first and last letter held in each
    partition are read, so the cost follows the letters held, not the ledger's history. Its
    two counts there tell whether anything changed: the positions are read again only then,
    by the sampler (and after a re-drive from the pages), never per request.
    """

    def __init__(self, store: Store, dlq_topic: str, letters: DeadLetterIndex) -> None:
        self._store = store
        self._dlq_topic = dlq_topic
        self._letters = letters
        self._spans: dict[int, tuple[int, int]] = {}
        self.size = browse.LedgerSize(0, 0)
        self.claimed: set[tuple[int, int]] = set()

    async def refresh(self) -> None:
        """Count the ledger's rows of the letters held; read their positions again if that moved."""
        spans = dict(self._letters.spans)
        size = await browse.ledger_size(self._store, self._dlq_topic, spans)
        if size != self.size or spans != self._spans:
            self.claimed = await browse.ledger_positions(self._store, self._dlq_topic, spans)
            self.size, self._spans = size, spans


class Live:
    """The sampling task and what it last saw."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.sample = Sample(datetime.now(UTC), errors=["not sampled yet"])
        self.rates: deque[tuple[float, int, int]] = deque()  # (time, sum of log ends, sum of committed)
        self.dead_letters = DeadLetterIndex(settings.kafka)
        self.ledger = RedriveLedger(store, settings.kafka.dead_letter_topic, self.dead_letters)
        self._http = httpx.AsyncClient(timeout=STATUS_TIMEOUT_S)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Live]:
        """Sample in the background for the block."""
        task = asyncio.create_task(self._run(), name="web-sampler")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._http.aclose()

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.refresh()
            await asyncio.sleep(max(0.0, self.settings.web.sample_interval_s - (time.monotonic() - started)))

    async def refresh(self) -> None:
        """One round: offsets, group, members, dead letters; what fails is noted on the pages."""
        errors: list[str] = []
        offsets = await self._guard(self._offsets(), errors, "offsets")
        group = await self._guard(
            describe_group_members(self.settings.kafka, self.settings.kafka.group_id, self.settings.kafka.topic), errors, "group"
        )
        rows = await self._guard(
            member_rows.recent(self.store, self.settings.kafka.group_id, self.settings.kafka.topic, 30.0), errors, "members"
        )
        await self._guard(self.dead_letters.refresh(), errors, "dead letters")
        await self._guard(self.ledger.refresh(), errors, "redrive ledger")
        state, kafka_members = group if group is not None else ("?", [])
        views = await self._members(kafka_members, rows or [])
        now = time.time()
        if offsets is not None:
            self.rates.append((now, sum(r.end for r in offsets), sum(r.committed or 0 for r in offsets)))
            while self.rates and self.rates[0][0] < now - RATE_WINDOW_S:
                self.rates.popleft()
        self.sample = Sample(datetime.now(UTC), offsets or self.sample.offsets, state, views, errors)

    async def _guard(self, call: Any, errors: list[str], what: str) -> Any:
        try:
            return await call
        except (WorkerError, OSError, TimeoutError) as exc:
            errors.append(f"{what}: {exc}")
            log.warning("web_sample_failed", what=what, reason=str(exc))
            return None

    async def _offsets(self) -> list[PartitionOffsets]:
        kafka = self.settings.kafka
        partitions = await topic_partitions(kafka, kafka.topic, CONNECT_TIMEOUT_S)
        async with PartitionReader(kafka, kafka.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
            bounds = await reader.bounds(partitions)
        committed = await group_offsets(kafka, kafka.group_id, kafka.topic, CONNECT_TIMEOUT_S)
        stored = await self.store.stored_offsets(kafka.group_id, kafka.topic)
        return [
            PartitionOffsets(p, first, end, committed[p][0] if p in committed else None, stored.get(p))
            for p, (first, end) in sorted(bounds.items())
        ]

    async def _members(self, kafka_members: Sequence[GroupMember], rows: Sequence[member_rows.Member]) -> list[MemberView]:
        by_id = {row.kafka_member_id: row for row in rows if row.kafka_member_id}
        pairs: list[tuple[GroupMember | None, member_rows.Member | None]] = [(m, by_id.get(m.member_id)) for m in kafka_members]
        # Workers that registered but are not (yet, or any more) in the group: shown too.
        pairs += [(None, row) for row in rows if row.kafka_member_id not in {m.member_id for m in kafka_members}]
        answers = await asyncio.gather(*(self._status(row) for _, row in pairs))
        return [MemberView(kafka, row, status, error) for (kafka, row), (status, error) in zip(pairs, answers, strict=True)]

    async def _status(self, row: member_rows.Member | None) -> tuple[dict[str, Any] | None, str | None]:
        if row is None:
            return None, "not registered in the database (observability off, or an older worker)"
        if row.url is None:
            return None, "its observability endpoint is disabled"
        try:
            response = await self._http.get(f"{row.url}/status")
            response.raise_for_status()
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return None, f"{row.url}/status did not answer: {exc or type(exc).__name__}"
        return (body, None) if isinstance(body, dict) else (None, f"{row.url}/status answered no JSON object")

    def events_per_second(self) -> dict[str, list[float]]:
        """The chart's series: time (epoch s), records produced per second, records committed per second."""
        series: dict[str, list[float]] = {"t": [], "produced": [], "committed": []}
        for (t0, end0, done0), (t1, end1, done1) in itertools.pairwise(self.rates):
            span = max(t1 - t0, 1e-3)
            series["t"].append(round(t1, 3))
            series["produced"].append(round(max(0, end1 - end0) / span, 2))
            series["committed"].append(round(max(0, done1 - done0) / span, 2))
        return series
