"""``rc-worker``: thin commands over the worker (parse args, load config, log, run).

Every command loads the same settings, so ``--config`` and RC_WORKER_* work everywhere.
Exit status: 0 done, 1 failed at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from worker import logs
from worker.config import Settings, load_settings
from worker.errors import ConfigError, PluginError, WorkerError
from worker.persistence.associations import Association


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rc-worker", description="Run Rocket.Chat app handlers on Kafka events.")
    parser.add_argument("--config", type=Path, help="config file (default: $RC_WORKER_CONFIG or ./config.yaml)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("run", help="run one worker of the consumer group until SIGTERM/SIGINT")

    topics = commands.add_parser("topics", help="manage the worker's topics").add_subparsers(dest="action", required=True)
    create = topics.add_parser("create", help="create the event, dead-letter and commands topics if missing")
    create.add_argument("--partitions", type=int, default=6, help="partitions of the event topic (default 6)")

    load = commands.add_parser("load", help="produce the records of a contract JSON-lines file, in order")
    load.add_argument("file", type=Path)
    load.add_argument("--topic", help="topic to produce to (default: kafka.topic)")

    db = commands.add_parser("db", help="manage the database schema").add_subparsers(dest="action", required=True)
    db.add_parser("upgrade", help="create or migrate the schema (idempotent)")

    state = commands.add_parser("state", help="inspect an app's persisted records").add_subparsers(dest="action", required=True)
    get = state.add_parser("get", help="the data of an app's records with an association, as a JSON list")
    get.add_argument("--app", required=True)
    get.add_argument("--association", required=True, help="MODEL:ID, e.g. misc:message-count")
    dump = state.add_parser("dump", help="every record of an app, one JSON object a line")
    dump.add_argument("--app", required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rc-worker`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        logs.configure(settings.logging)
        handler = _COMMANDS[(args.command, getattr(args, "action", None))]
        return asyncio.run(handler(settings, args))
    except (ConfigError, PluginError) as exc:
        print(f"rc-worker: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"rc-worker: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(settings: Settings, _args: argparse.Namespace) -> int:
    from worker.plugins import load_apps
    from worker.runner import Worker

    apps = load_apps(settings.handlers.enabled, settings.handlers.settings)
    worker = Worker(settings, apps)
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is None:  # pragma: no cover - asyncio.run always runs us in a task
        raise RuntimeError("rc-worker run must be called from a task")
    deadline: list[asyncio.TimerHandle] = []

    def on_signal() -> None:
        worker.stop()
        if not deadline:  # a second signal does not extend the deadline
            deadline.append(loop.call_later(settings.processing.shutdown_timeout_s, task.cancel))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await worker.run()
    except asyncio.CancelledError:
        print(f"rc-worker: shutdown took longer than {settings.processing.shutdown_timeout_s}s; stopped hard", file=sys.stderr)
        return 1
    return 0


async def _topics_create(settings: Settings, args: argparse.Namespace) -> int:
    from worker.kafka import create_topics

    if args.partitions < 1:
        raise ConfigError("--partitions must be at least 1")
    created = await create_topics(settings.kafka, args.partitions)
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0


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


async def _load(settings: Settings, args: argparse.Namespace) -> int:
    from worker.kafka import Outgoing, Producer

    records = read_records_file(args.file)
    topic = args.topic or settings.kafka.topic
    async with Producer(settings.kafka) as producer:
        await producer.send_many([Outgoing(topic, r.key, r.value, r.headers) for r in records])
    print(f"loaded {len(records)} records into {topic}")
    return 0


async def _db_upgrade(settings: Settings, _args: argparse.Namespace) -> int:
    from worker.persistence.store import Store

    store = Store.from_settings(settings.persistence)
    try:
        before, after = await store.upgrade()
    finally:
        await store.close()
    print(f"schema at revision {after}" + (f" (was {before})" if before != after else " (already current)"))
    return 0


async def _state_get(settings: Settings, args: argparse.Namespace) -> int:
    from worker.persistence.store import Store

    association = str(Association.parse(args.association))
    store = Store.from_settings(settings.persistence)
    try:
        await store.check_schema()
        found = await store.app_records(args.app, association)
    finally:
        await store.close()
    sys.stdout.write(orjson.dumps([orjson.loads(r.data) for r in found]).decode() + "\n")
    return 0


async def _state_dump(settings: Settings, args: argparse.Namespace) -> int:
    from worker.persistence.store import Store

    store = Store.from_settings(settings.persistence)
    try:
        await store.check_schema()
        found = await store.app_records(args.app)
    finally:
        await store.close()
    for record in found:
        line = {"id": record.id, "version": record.version, "associations": list(record.associations), "data": orjson.loads(record.data)}
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
    return 0


_COMMANDS: dict[tuple[str, str | None], Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    ("run", None): _run,
    ("topics", "create"): _topics_create,
    ("load", None): _load,
    ("db", "upgrade"): _db_upgrade,
    ("state", "get"): _state_get,
    ("state", "dump"): _state_dump,
}
