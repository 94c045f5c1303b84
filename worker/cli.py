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
from worker.check_config import check_config_command
from worker.config import Settings, load_settings
from worker.errors import ConfigError, InvalidDataError, PluginError, WorkerError
from worker.persistence.associations import Association
from worker.plugins import handlers_command
from worker.scaffold import new_handler_command


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
    db.add_parser("prune", help="delete processed-event markers past their retention; print how many").add_argument(
        "--older-than-hours", type=int, metavar="N", help="processed over N hours ago (default: processed_retention_hours; 0 keeps all)"
    )

    state = commands.add_parser("state", help="inspect an app's persisted records").add_subparsers(dest="action", required=True)
    get = state.add_parser("get", help="the data of an app's records with an association, as a JSON list")
    get.add_argument("--app", required=True)
    get.add_argument("--association", required=True, help="MODEL:ID, e.g. misc:message-count")
    dump = state.add_parser("dump", help="every record of an app, one JSON object a line")
    dump.add_argument("--app", required=True)

    handlers = commands.add_parser("handlers", help="list the installed handler plugins: ids, versions, settings, enabled")
    handlers.add_argument("--json", action="store_true", help="one JSON document instead of text")
    new_handler = commands.add_parser("new-handler", help="create a handler plugin package, ready to install and test")
    new_handler.add_argument("name", help="the app id, lower-case words joined by dashes, e.g. link-counter")
    new_handler.add_argument("--dir", type=Path, help="where to create it (default: ./NAME)")

    replay = commands.add_parser("replay", help="process a range of the topic through chosen handlers into a database, then exit")
    replay_from = replay.add_mutually_exclusive_group(required=True)
    replay_from.add_argument("--from-beginning", action="store_true", help="from the first record of every partition")
    replay_from.add_argument("--from-offset", metavar="P:O[,P:O...]", help="only these partitions, each from its offset")
    replay_from.add_argument("--from-time", metavar="ISO8601", help="from the first record at or after this time (UTC unless given)")
    replay.add_argument("--to-time", metavar="ISO8601", help="stop before this time (default: the end offsets as they are at start)")
    replay.add_argument("--topic", help="topic to replay (default: kafka.topic); the live group's offsets never move")
    replay.add_argument("--handlers", metavar="A,B", help="app ids to run, in order (default: handlers.enabled)")
    replay.add_argument("--state", required=True, metavar="URL", help="database to replay into, migrated if fresh")
    replay.add_argument("--group", metavar="NAME", help="share the replay among processes given the same NAME; run again to resume")
    replay.add_argument("--json", action="store_true", help="print the summary as one JSON object")

    dump_topic = commands.add_parser("dump", help="write a range of the topic as contract JSON lines, which `load` reproduces")
    dump_topic.add_argument("--topic", help="topic to dump (default: kafka.topic)")
    dump_topic.add_argument("--from-time", metavar="ISO8601", help="from the first record at or after this time")
    dump_topic.add_argument("--to-time", metavar="ISO8601", help="up to the last record before this time")
    dump_topic.add_argument("--partition", type=int, metavar="P", help="only this partition")
    dump_topic.add_argument("--output", "-o", type=Path, metavar="FILE", help="write FILE (whole or not at all) instead of stdout")

    dlq = commands.add_parser("dlq", help="inspect and re-drive the dead-letter topic").add_subparsers(dest="action", required=True)
    dlq_list = dlq.add_parser("list", help="one line per dead letter: position, origin, app, stage, reason, redrive status, truncation")
    dlq_redrive = dlq.add_parser("redrive", help="send dead letters back, each once: to their topic, or with --app through that app")
    for dlq_command in (dlq_list, dlq_redrive):
        dlq_command.add_argument("--app", metavar="A", help="only app A's dead letters (redrive: straight through A into the database)")
        dlq_command.add_argument("--reason", metavar="R", help="only dead letters whose reason contains R")
    dlq_list.add_argument("--json", action="store_true", help="one JSON object a line")
    dlq_redrive.add_argument("--dry-run", action="store_true", help="print what would be sent; send and record nothing")

    offsets = commands.add_parser("offsets", help="the consumer group's offsets").add_subparsers(dest="action", required=True)
    offsets.add_parser("show", help="per partition: earliest, committed, stored with the state, end, lag").add_argument(
        "--json", action="store_true", help="one JSON object a line"
    )
    reset = offsets.add_parser(
        "reset",
        help="move the group's committed offsets and the state's stored ones; refused while the group has active members",
        description="Moves the group's offsets in Kafka and in the state database (a worker starts at the later of the two). "
        "Refused while the group has active members. Going back re-reads events: those already processed are recognised "
        "as duplicates and change nothing; to rebuild state, replay into a fresh database (rc-worker replay).",
    )
    reset_to = reset.add_mutually_exclusive_group(required=True)
    reset_to.add_argument("--to-earliest", action="store_true", help="the first offset of every partition")
    reset_to.add_argument("--to-latest", action="store_true", help="the end of every partition: skip everything not yet read")
    reset_to.add_argument("--to-time", metavar="ISO8601", help="the first offset at or after this time, per partition")
    reset_to.add_argument("--to-offset", metavar="P:O[,P:O...]", help="these partitions to these offsets; others stay")
    reset.add_argument("--dry-run", action="store_true", help="print the new offsets; change nothing")

    web = commands.add_parser("web", help="serve the status pages of the whole group (lag, dead letters, state, topic, health)")
    web.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (as the global --config)")
    web.add_argument("--host", help="address to listen on (default: web.host, 127.0.0.1)")
    web.add_argument("--port", type=int, help="port to listen on (default: web.port, 8080; 0 picks a free one)")

    check = commands.add_parser("check-config", help="validate and print the effective configuration, secrets redacted")
    check.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (as the global --config)")
    check.add_argument("--reference", action="store_true", help="print every key, its variable and default as a Markdown table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rc-worker`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        logs.configure(settings.logging, secrets=logs.secrets_of(settings))
        handler = _COMMANDS[(args.command, getattr(args, "action", None))]
        return asyncio.run(handler(settings, args))
    except (ConfigError, PluginError) as exc:
        print(f"rc-worker: {logs.redact(str(exc))}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"rc-worker: error: {logs.redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def _run(settings: Settings, _args: argparse.Namespace) -> int:
    from worker.observability import serve
    from worker.plugins import load_apps
    from worker.runner import Worker

    apps = load_apps(settings.handlers.enabled, settings.handlers.settings)
    worker = Worker(settings, apps)
    pages = None
    if settings.observability.web:
        from worker.web.embedded import pages_factory

        pages = pages_factory(settings)
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
        async with serve(settings.observability, worker, pages=pages):
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

    try:
        association = str(Association.parse(args.association))
    except InvalidDataError as exc:
        raise ConfigError(f"--association: {exc}") from None
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


# The data tools live in modules of their own, imported only by the command that uses them.


async def _db_prune(settings: Settings, args: argparse.Namespace) -> int:
    from worker.persistence.retention import prune_command

    return await prune_command(settings, args)


async def _replay(settings: Settings, args: argparse.Namespace) -> int:
    from worker.replay import command

    return await command(settings, args)


async def _dump(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dump import command

    return await command(settings, args)


async def _dlq_list(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dlq import list_command

    return await list_command(settings, args)


async def _dlq_redrive(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dlq import redrive_command

    return await redrive_command(settings, args)


async def _web(settings: Settings, args: argparse.Namespace) -> int:
    from worker.web.server import command

    return await command(settings, args)


async def _offsets_show(settings: Settings, args: argparse.Namespace) -> int:
    from worker.offsets_admin import show_command

    return await show_command(settings, args)


async def _offsets_reset(settings: Settings, args: argparse.Namespace) -> int:
    from worker.offsets_admin import reset_command

    return await reset_command(settings, args)


_COMMANDS: dict[tuple[str, str | None], Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]]] = {
    ("run", None): _run,
    ("topics", "create"): _topics_create,
    ("load", None): _load,
    ("db", "upgrade"): _db_upgrade,
    ("db", "prune"): _db_prune,
    ("state", "get"): _state_get,
    ("state", "dump"): _state_dump,
    ("handlers", None): handlers_command,
    ("new-handler", None): new_handler_command,
    ("replay", None): _replay,
    ("dump", None): _dump,
    ("dlq", "list"): _dlq_list,
    ("dlq", "redrive"): _dlq_redrive,
    ("offsets", "show"): _offsets_show,
    ("offsets", "reset"): _offsets_reset,
    ("check-config", None): check_config_command,
    ("web", None): _web,
}
