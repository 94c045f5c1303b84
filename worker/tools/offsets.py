"""``rc-worker offsets``: where the consumer group stands, and moving it, as Kafka's reset tool does.

A worker that takes a partition starts at the later of two offsets: the group's committed
offset in Kafka and the next offset committed with the state in the database
(``partition_offsets``). ``show`` prints both with the log's bounds and the lag that
follows; ``reset`` therefore moves both, or a reset backwards would be overruled by the
database. It refuses while the group has active members, whose next commit would undo it.
Going back re-reads events, and the database recognises the ones it has processed (their
markers) as duplicates: a reset backwards re-processes only what was never processed, and
rebuilding state is ``rc-worker replay`` into a fresh database.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from worker.config import KafkaSettings, Settings
from worker.errors import WorkerError
from worker.kafka import PartitionReader, commit_group_offsets, describe_group, group_offsets
from worker.persistence.admin import schema_revision, set_stored_offsets
from worker.persistence.store import Store
from worker.tools.common import CONNECT_TIMEOUT_S, Start, configured_store, parse_offsets, parse_time, plan
from worker.tools.progress import Progress


class GroupActiveError(WorkerError):
    """Raised when a reset is asked of a consumer group that has active members."""


@dataclass(frozen=True, slots=True)
class PartitionOffsets:
    """One partition as ``offsets show`` prints it."""

    partition: int
    earliest: int
    end: int
    committed: int | None
    stored: int | None

    @property
    def start(self) -> int:
        """Where a worker taking the partition now would start."""
        known = [o for o in (self.committed, self.stored) if o is not None]
        return max(known) if known else self.earliest

    @property
    def lag(self) -> int:
        """Records between that start and the log end."""
        return max(0, self.end - self.start)


async def _stored(settings: Settings) -> dict[int, int] | None:
    """The offsets kept with the state; None when there is no state database with the schema."""
    store = configured_store(settings)
    if store is None:
        return None
    try:
        if await schema_revision(store) is None:
            return None
        await store.check_schema()
        return await store.stored_offsets(settings.kafka.group_id, settings.kafka.topic)
    finally:
        await store.close()


async def survey(settings: Settings) -> list[PartitionOffsets]:
    """Every partition of the topic: its bounds, the group's committed and the stored offset."""
    kafka = settings.kafka
    async with PartitionReader(kafka, kafka.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
        spans = await plan(kafka, reader, Start())
    committed = await group_offsets(kafka, kafka.group_id, kafka.topic, CONNECT_TIMEOUT_S)
    stored = await _stored(settings) or {}
    return [
        PartitionOffsets(p, span.start, span.end, committed[p][0] if p in committed else None, stored.get(p)) for p, span in spans.items()
    ]


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


async def show_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker offsets show``."""
    kafka = settings.kafka
    group = await describe_group(kafka, kafka.group_id, CONNECT_TIMEOUT_S)
    rows = await survey(settings)
    if args.json:
        for row in rows:
            print(
                orjson.dumps(
                    {
                        "partition": row.partition,
                        "earliest": row.earliest,
                        "committed": row.committed,
                        "stored": row.stored,
                        "end": row.end,
                        "lag": row.lag,
                    }
                ).decode()
            )
        return 0
    print(f"group {kafka.group_id} on {kafka.topic}: {group.state}, {len(group.members)} active members")
    print(f"{'partition':>9} {'earliest':>10} {'committed':>10} {'stored':>10} {'end':>10} {'lag':>10}")
    for row in rows:
        print(f"{row.partition:>9} {row.earliest:>10} {_cell(row.committed):>10} {_cell(row.stored):>10} {row.end:>10} {row.lag:>10}")
    print(f"total lag: {sum(row.lag for row in rows)} (a worker starts at the later of committed and stored)")
    return 0


async def targets(kafka: KafkaSettings, args: argparse.Namespace) -> dict[int, int]:
    """The new offset per partition that the reset arguments name."""
    async with PartitionReader(kafka, kafka.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
        if args.to_offset:
            offsets = parse_offsets(args.to_offset, "--to-offset")
            spans = await plan(kafka, reader, Start(offsets=offsets))
            return {p: span.start for p, span in spans.items()}
        if args.to_time:
            spans = await plan(kafka, reader, Start(time_ms=parse_time(args.to_time, "--to-time")))
            return {p: span.start for p, span in spans.items()}
        spans = await plan(kafka, reader, Start())
        return {p: span.end if args.to_latest else span.start for p, span in spans.items()}


async def reset_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker offsets reset``: Kafka first (refused by the broker too if a member appeared), then the database."""
    kafka = settings.kafka
    group = await describe_group(kafka, kafka.group_id, CONNECT_TIMEOUT_S)
    if group.members:
        raise GroupActiveError(
            f"consumer group {kafka.group_id} has {len(group.members)} active members ({', '.join(group.members)}); "
            "stop its workers (SIGTERM each `rc-worker run`), then reset again"
        )
    new = await targets(kafka, args)
    rows = {row.partition: row for row in await survey(settings)}
    print(f"{'partition':>9} {'committed':>10} {'stored':>10} {'new':>10}")
    for partition, offset in sorted(new.items()):
        row = rows[partition]
        print(f"{partition:>9} {_cell(row.committed):>10} {_cell(row.stored):>10} {offset:>10}")
    if args.dry_run:
        print("dry run: nothing changed")
        return 0
    store = configured_store(settings)
    # Kafka's offsets in one commit, then the database's one partition after another.
    with Progress("offsets reset", len(new) * (2 if store is not None else 1), unit="offsets") as progress:
        await commit_group_offsets(kafka, kafka.group_id, kafka.topic, new, CONNECT_TIMEOUT_S)
        progress.advance(len(new))
        changed = await _set_stored(store, kafka, new, lambda: progress.advance(1)) if store is not None else []
    print(f"reset {len(new)} partitions of group {kafka.group_id}" + (f"; database offsets of partitions {changed} too" if changed else ""))
    return 0


async def _set_stored(store: Store, kafka: KafkaSettings, new: dict[int, int], on_each: Callable[[], None]) -> list[int]:
    try:
        if await schema_revision(store) is None:
            return []
        try:
            return await set_stored_offsets(store, kafka.group_id, kafka.topic, new, on_each)
        except WorkerError as exc:
            raise WorkerError(
                f"Kafka's offsets were reset, but the database's were not ({exc}); a worker would start at the later "
                "of the two, so run the same reset again once the database is reachable"
            ) from exc
    finally:
        await store.close()
