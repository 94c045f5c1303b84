"""``rc-worker dump``: a range of a topic as the contract's JSON-lines file, for ``rc-worker load``.

One line a record, partition after partition, each in offset order: ``key`` (its UTF-8
text, or null), ``headers`` (name -> UTF-8 text), and ``value`` (the value's UTF-8 text) or
``value_b64`` (base64, for a value that is not UTF-8, such as the contract's invalid
sample). ``rc-worker load`` produces the same keys, values and headers byte for byte; the
key picks the partition (Kafka's default partitioner), so a topic with the same partition
count gets every keyed record back into its old partition, in its old order. A record the
format cannot hold faithfully (a tombstone, a key or header that is not UTF-8, a header
name given twice) stops the dump at its position, and nothing is written.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from worker.config import KafkaSettings, Settings
from worker.errors import ConfigError, WorkerError
from worker.events import RawRecord
from worker.kafka import PartitionReader
from worker.tools.common import CONNECT_TIMEOUT_S, Start, parse_time, plan, read_spans, require_records, require_topic
from worker.tools.progress import Progress

# Keep this much of a dump in memory before spilling to a temporary file.
SPOOL_BYTES = 32 * 1024 * 1024
# `load` sends this many records at a time, each chunk acknowledged before the progress moves on.
LOAD_CHUNK = 1000


class DumpError(WorkerError):
    """Raised when a record cannot be written faithfully in the contract's JSON-lines format."""


@dataclass(frozen=True, slots=True)
class DumpSummary:
    """How many records a dump wrote, from which partitions."""

    topic: str
    records: int
    partitions: list[int]


def encode_record(record: RawRecord) -> bytes:
    """One JSON line for ``record``.

    Raises:
        DumpError: the record has no value, or a key or header the format cannot hold.

    """
    where = f"{record.topic}[{record.partition}]@{record.offset}"
    if record.value is None:
        raise DumpError(f"{where} is a tombstone (no value), which the JSON-lines format cannot hold; nothing was written")
    line: dict[str, Any] = {"key": _text(record.key, where, "its key") if record.key is not None else None, "headers": {}}
    for name, value in record.headers:
        if name in line["headers"]:
            raise DumpError(f"{where} has header {name!r} twice, which the JSON-lines format cannot hold; nothing was written")
        line["headers"][name] = _text(value, where, f"header {name!r}")
    try:
        line["value"] = record.value.decode("utf-8")
    except UnicodeDecodeError:
        line["value_b64"] = base64.b64encode(record.value).decode("ascii")
    return orjson.dumps(line) + b"\n"


def _text(raw: bytes | None, where: str, what: str) -> str:
    try:
        return (raw or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise DumpError(f"{where}: {what} is not UTF-8, which the JSON-lines format cannot hold; nothing was written") from None


async def dump(
    settings: KafkaSettings,
    out: IO[bytes],
    *,
    partition: int | None = None,
    from_time_ms: int | None = None,
    to_time_ms: int | None = None,
) -> DumpSummary:
    """Write the records of ``settings.topic`` in the range to ``out``.

    Raises:
        ConfigError: the topic or partition does not exist, or the range holds no record.
        DumpError: a record cannot be written faithfully.
        BrokerError: Kafka cannot be reached.

    """
    start = Start(time_ms=from_time_ms)
    written = 0
    async with PartitionReader(settings, settings.topic, timeout_s=CONNECT_TIMEOUT_S) as reader:
        spans = await plan(settings, reader, start, to_time_ms, None if partition is None else [partition])
        require_records(spans, settings.topic, start, to_time_ms)
        sizes = {p: span.size for p, span in spans.items() if span.size}
        with Progress("dump", sum(sizes.values()), partitions=sizes) as progress:
            async for record in read_spans(reader, spans, settings.fetch_timeout_ms, settings.max_batch_records):
                out.write(encode_record(record))
                written += 1
                progress.advance(1, partition=record.partition)
    return DumpSummary(settings.topic, written, [p for p, s in spans.items() if s.size])


async def command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker dump``: the whole dump goes to a spool first, so a failure writes nothing."""
    kafka = settings.kafka.model_copy(update={"topic": args.topic or settings.kafka.topic})
    from_time_ms = parse_time(args.from_time, "--from-time") if args.from_time else None
    to_time_ms = parse_time(args.to_time, "--to-time") if args.to_time else None
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES) as spool:
        summary = await dump(kafka, spool, partition=args.partition, from_time_ms=from_time_ms, to_time_ms=to_time_ms)
        spool.seek(0)
        _deliver(spool, args.output)
    where = args.output or "stdout"
    print(f"dumped {summary.records} records of {summary.topic} (partitions {summary.partitions}) to {where}", file=sys.stderr)
    return 0


def _deliver(spool: IO[bytes], output: Path | None) -> None:
    if output is None:
        sys.stdout.flush()
        shutil.copyfileobj(spool, sys.stdout.buffer)
        sys.stdout.buffer.flush()
        return
    # Written beside the target and renamed: a reader never sees half a file.
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", dir=output.parent)
    try:
        with os.fdopen(handle, "wb") as target:
            shutil.copyfileobj(spool, target)
        Path(temporary).replace(output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# -- rc-worker load: the same format read back --------------------------------------------


@dataclass(frozen=True, slots=True)
class FileRecord:
    """One line of a contract JSON-lines file."""

    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


def read_records_file(path: Path) -> list[FileRecord]:
    """Parse a contract JSON-lines file; ConfigError names the line and the problem."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(_parse_line(line))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path}:{number}: {exc}; nothing was sent") from None
    return records


def _parse_line(line: bytes) -> FileRecord:
    try:
        item = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise ValueError("each line must be a JSON object with key, headers and value")
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        raise ValueError("key must be a string or null")
    headers = item.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ValueError("headers must be an object of strings")
    if ("value" in item) == ("value_b64" in item):
        raise ValueError("exactly one of value and value_b64 is needed")
    if "value" in item:
        if not isinstance(item["value"], str):
            raise ValueError("value must be a string (the record value's UTF-8 text)")
        value = item["value"].encode()
    else:
        value = base64.b64decode(item["value_b64"], validate=True)
    return FileRecord(key.encode() if key is not None else None, value, tuple((k, v.encode()) for k, v in headers.items()))


async def load_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker load FILE [--topic T] [--create-topic]``: produce the file's records, in order, to a topic that exists."""
    from worker.kafka import Outgoing, Producer

    records = read_records_file(args.file)
    topic = args.topic or settings.kafka.topic
    await require_topic(settings.kafka, topic, create=args.create_topic)
    async with Producer(settings.kafka) as producer:
        with Progress("load", len(records)) as progress:
            for first in range(0, len(records), LOAD_CHUNK):
                chunk = records[first : first + LOAD_CHUNK]
                await producer.send_many([Outgoing(topic, r.key, r.value, r.headers) for r in chunk])
                progress.advance(len(chunk))
    print(f"loaded {len(records)} records into {topic}")
    return 0
