"""``rc-worker``: thin commands over the worker (parse args, load config, log, run).

Every command loads the same settings, so ``--config`` and RC_WORKER_* work everywhere.
Exit status: 0 done, 1 failed at run time, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError, PluginError, WorkerError

if TYPE_CHECKING:
    from worker.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rc-worker", description="Run Rocket.Chat app handlers on Kafka events.")
    parser.add_argument("--config", type=Path, help="config file (default: $RC_WORKER_CONFIG or ./config.yaml)")
    output_flags(parser, default=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one worker of the consumer group until SIGTERM/SIGINT")
    run.set_defaults(runs="worker.tools.run:command")
    ingest = commands.add_parser("ingest", help="serve the HTTP endpoint that puts Rocket.Chat's messages on the topic (config: ingest)")
    ingest.set_defaults(runs="worker.bridge.ingest:ingest_command")
    apply = commands.add_parser("apply", help="apply the commands topic to Rocket.Chat through its REST API (config: rocketchat)")
    apply.set_defaults(runs="worker.bridge.apply:apply_command")

    topics = commands.add_parser("topics", help="manage the worker's topics").add_subparsers(dest="action", required=True)
    create = topics.add_parser("create", help="create the event, dead-letter, commands and apply dead-letter topics if missing")
    create.add_argument("--partitions", type=int, default=6, help="partitions of the event topic (default 6)")
    create.set_defaults(runs="worker.tools.topics:create_command")

    load = commands.add_parser("load", help="produce the records of a contract JSON-lines file, in order")
    load.add_argument("file", type=Path)
    load.add_argument("--topic", help="topic to produce to (default: kafka.topic)")
    load.add_argument("--create-topic", action="store_true", help="create the topic if it does not exist (as `rc-worker topics create`)")
    load.set_defaults(runs="worker.tools.dump:load_command")

    db = commands.add_parser("db", help="manage the database schema").add_subparsers(dest="action", required=True)
    upgrade = db.add_parser("upgrade", help="create or migrate the schema (idempotent)")
    upgrade.set_defaults(runs="worker.tools.state:upgrade_command")
    prune = db.add_parser("prune", help="delete processed-event markers past their retention; print how many")
    prune.add_argument(
        "--older-than-hours", type=int, metavar="N", help="processed over N hours ago (default: processed_retention_hours; 0 keeps all)"
    )
    prune.set_defaults(runs="worker.tools.state:prune_command")

    state = commands.add_parser("state", help="inspect an app's persisted records").add_subparsers(dest="action", required=True)
    get = state.add_parser("get", help="the data of an app's records with an association, as a JSON list")
    get.add_argument("--app", required=True)
    get.add_argument("--association", required=True, help="MODEL:ID, e.g. misc:message-count")
    get.set_defaults(runs="worker.tools.state:get_command")
    dump = state.add_parser("dump", help="every record of an app, one JSON object a line")
    dump.add_argument("--app", required=True)
    dump.set_defaults(runs="worker.tools.state:dump_command")

    handlers = commands.add_parser("handlers", help="list the installed handler plugins: ids, versions, settings, enabled")
    handlers.add_argument("--json", action="store_true", help="one JSON document instead of text")
    handlers.set_defaults(runs="worker.plugins:handlers_command", loop=False)
    new_handler = commands.add_parser("new-handler", help="create a handler plugin package, ready to install and test")
    new_handler.add_argument("name", help="the app id, lower-case words joined by dashes, e.g. link-counter")
    new_handler.add_argument("--dir", type=Path, help="where to create it (default: ./NAME)")
    new_handler.set_defaults(runs="worker.tools.scaffold:new_handler_command")

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
    replay.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="split the partitions among N processes of one replay group (--group, or a new one); for large topics",
    )
    replay.set_defaults(runs="worker.tools.replay:command")

    dump_topic = commands.add_parser("dump", help="write a range of the topic as contract JSON lines, which `load` reproduces")
    dump_topic.add_argument("--topic", help="topic to dump (default: kafka.topic)")
    dump_topic.add_argument("--from-time", metavar="ISO8601", help="from the first record at or after this time")
    dump_topic.add_argument("--to-time", metavar="ISO8601", help="up to the last record before this time")
    dump_topic.add_argument("--partition", type=int, metavar="P", help="only this partition")
    dump_topic.add_argument("--output", "-o", type=Path, metavar="FILE", help="write FILE (whole or not at all) instead of stdout")
    dump_topic.set_defaults(runs="worker.tools.dump:command")

    dlq = commands.add_parser("dlq", help="inspect and re-drive the dead-letter topic").add_subparsers(dest="action", required=True)
    dlq_list = dlq.add_parser("list", help="one line per dead letter: position, origin, app, stage, reason, redrive status, truncation")
    dlq_list.set_defaults(runs="worker.tools.dlq:list_command")
    dlq_redrive = dlq.add_parser("redrive", help="send dead letters back, each once: to their topic, or with --app through that app")
    dlq_redrive.set_defaults(runs="worker.tools.dlq:redrive_command")
    for dlq_command in (dlq_list, dlq_redrive):
        dlq_command.add_argument("--app", metavar="A", help="only app A's dead letters (redrive: straight through A into the database)")
        dlq_command.add_argument("--reason", metavar="R", help="only dead letters whose reason contains R")
    dlq_list.add_argument("--json", action="store_true", help="one JSON object a line")
    dlq_redrive.add_argument("--dry-run", action="store_true", help="print what would be sent; send and record nothing")
    dlq_redrive.add_argument(
        "--force",
        action="store_true",
        help="send to the topic events older than persistence.processed_retention_hours too (apps that processed them count them again)",
    )

    offsets = commands.add_parser("offsets", help="the consumer group's offsets").add_subparsers(dest="action", required=True)
    show = offsets.add_parser("show", help="per partition: earliest, committed, stored with the state, end, lag")
    show.add_argument("--json", action="store_true", help="one JSON object a line")
    show.set_defaults(runs="worker.tools.offsets:show_command")
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
    reset.set_defaults(runs="worker.tools.offsets:reset_command")

    web = commands.add_parser("web", help="serve the status pages of the whole group (lag, dead letters, state, topic, health)")
    web.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (as the global --config)")
    web.add_argument("--host", help="address to listen on (default: web.host, 127.0.0.1)")
    web.add_argument("--port", type=int, help="port to listen on (default: web.port, 8080; 0 picks a free one)")
    web.set_defaults(runs="worker.web.server:command")

    check = commands.add_parser("check-config", help="validate and print the effective configuration, secrets redacted")
    check.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="config file (as the global --config)")
    check.add_argument("--reference", action="store_true", help="print every key, its variable and default as a Markdown table")
    check.set_defaults(runs="worker.tools.check_config:check_config_command", loop=False)
    for command in _leaves(parser):
        output_flags(command)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's own parser (``dlq list``, ``replay``, ...), below ``parser``."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_leaves(sub) or [sub])
    return found


def output_flags(parser: argparse.ArgumentParser, default: Any = argparse.SUPPRESS) -> None:
    """``--quiet``, ``--verbose`` and ``--log-format``, accepted before the command and after it."""
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const="quiet",
        default=default,
        help="no progress display, only warnings and errors in the log; results are still printed",
    )
    loudness.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const="verbose", default=default, help="debug log lines too (per batch)"
    )
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default=default,
        help="log lines as JSON, or for a person (default: logging.format; auto is JSON unless stderr is a terminal)",
    )


def _configure_output(settings: Settings, args: argparse.Namespace) -> None:
    from worker import logs
    from worker.tools import progress

    logging = settings.logging
    if args.log_format is not None:
        logging = logging.model_copy(update={"format": args.log_format})
    level = {"quiet": "warning", "verbose": "debug"}.get(args.verbosity or "")
    logs.configure(logging, secrets=logs.secrets_of(settings), level=level)
    log_format = "json" if logs.as_json(logging) else "console"
    progress.configure(progress.choose(quiet=args.verbosity == "quiet", log_format=log_format))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rc-worker`` console script."""
    args = _parser().parse_args(argv)
    # Imported once the arguments are read: `--help` and a usage error need no settings or logs.
    from worker import logs
    from worker.config import load_settings

    try:
        settings = load_settings(args.config)
        _configure_output(settings, args)
        module, _, function = args.runs.partition(":")
        # Each command's module is imported only when it runs: `rc-worker --help` and
        # check-config start without Kafka, database or HTTP clients.
        handler: Handler = getattr(importlib.import_module(module), function)
        return _run(handler(settings, args), loop=getattr(args, "loop", True))
    except (ConfigError, PluginError) as exc:
        print(f"rc-worker: {logs.redact(str(exc))}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"rc-worker: error: {logs.redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


Handler = Callable[["Settings", argparse.Namespace], Coroutine[Any, Any, int]]


def _run(command: Coroutine[Any, Any, int], *, loop: bool) -> int:
    """Run a command's coroutine to its exit status: in an event loop, or stepped once when it awaits nothing."""
    if loop:
        import asyncio

        return asyncio.run(command)
    # check-config and handlers (set_defaults(loop=False)) await nothing, so one step finishes
    # them; importing asyncio and starting a loop would be a sixth of their start-up.
    try:
        command.send(None)
    except StopIteration as finished:
        return int(finished.value)
    command.close()
    raise RuntimeError("a command marked loop=False awaited something: it needs the event loop")


def _table(parser: argparse.ArgumentParser) -> dict[tuple[str, str | None], tuple[str, str]]:
    """(command, action) -> (module, function) of every command, as its parser's ``runs`` default names them."""
    table: dict[tuple[str, str | None], tuple[str, str]] = {}
    for leaf in _leaves(parser):
        names = leaf.prog.split()[1:]  # "rc-worker dlq list" -> ["dlq", "list"]
        module, _, function = leaf.get_default("runs").partition(":")
        table[(names[0], names[1] if len(names) > 1 else None)] = (module, function)
    return table


if TYPE_CHECKING:
    # (command, action) -> (module, coroutine function(settings, args) -> exit status). Each command's
    # parser names its function (set_defaults(runs="module:function"), imported only when it runs);
    # this table is read back from the parser, so the two cannot disagree.
    COMMANDS: dict[tuple[str, str | None], tuple[str, str]]


def __getattr__(name: str) -> Any:
    # COMMANDS is made on first use (PEP 562): building every parser at import would cost each
    # command a second build of the parser main() makes anyway.
    if name == "COMMANDS":
        table = globals()["COMMANDS"] = _table(_parser())
        return table
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
