"""`python -m bench` (`make bench`): every scenario of issues 8 and 14 in one run, one table at the end.

Exit status: 0 when every scenario counted exactly, 1 when one lost or doubled counts or could
not finish, 2 on bad usage or missing services.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import profile
from bench.dataset import Dataset, Layout, Topic, delete_created_topics, generate, load, new_topic
from bench.naive import naive
from bench.raw import ceiling
from bench.replay import replay, startup_ms
from bench.report import (
    BOTH_X1,
    BOTH_X3,
    POSTGRES_X1,
    SQLITE_X1,
    Result,
    hot_name,
    rate_of,
    save,
    startup_text,
    table,
    targets,
    targets_text,
    uniform_name,
)
from bench.services import ServiceError, Services, find_services
from bench.steady import steady
from bench.workers import APP, MENTIONS, Scenario, run_scenario
from worker.config import load_settings
from worker.errors import BrokerError, ConfigError

ROOT = Path(__file__).resolve().parent.parent
BOTH = (APP, MENTIONS)
# --long: one worker over each of these many events; throughput should stay flat between them.
LONG_COUNTS = (100_000, 1_000_000)
# The long runs measure flatness over the whole topic, so they are not capped in practice.
LONG_CAP_S = 3600.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, help="events in the topic (default 200,000; --quick 10,000)")
    parser.add_argument(
        "--quick", action="store_true", help="few events, one worker per scenario, no steady load: checks it runs and counts"
    )
    parser.add_argument(
        "--long", action="store_true", help="also the memory/flatness check: one SQLite worker over 100,000 and 1,000,000 events"
    )
    parser.add_argument("--skip-postgres", action="store_true", help="SQLite scenarios only")
    parser.add_argument("--rooms", type=int, default=500, help="rooms of the uniform dataset (default 500)")
    parser.add_argument("--users", type=int, default=1000, help="senders of the generated events (default 1000)")
    parser.add_argument("--seed", type=int, default=8, help="generator seed (default 8)")
    parser.add_argument("--naive-seconds", type=float, help="cap of the naive baseline (default 20 s; --quick 3 s)")
    parser.add_argument(
        "--cap-seconds",
        type=float,
        help="stop an rc-worker scenario after this long processing, rate taken so far (default 45 s; --quick 15 s)",
    )
    parser.add_argument("--steady-seconds", type=float, default=20, help="length of the steady-load scenario (default 20 s)")
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="record the SQLite x1 worker with py-spy into DIR and print its top functions"
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (worker logs, databases) and the topics")
    return parser


@dataclass(frozen=True, slots=True)
class Plan:
    """What this run measures."""

    events: int
    quick: bool
    long: bool
    postgres: bool
    naive_s: float
    steady_s: float
    cap_s: float
    max_records: int


def _say(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _report(result: Result) -> Result:
    rate = f"{result.rate:,.0f} events/s" if result.rate else "no rate"
    counts = {True: "exact", False: "COUNTS DIFFER", None: "no counters"}[result.exact]
    _say(f"{result.scenario}: {rate}, {counts}{', ' + result.error if result.error else ''} ({result.seconds:.0f} s)")
    return result


def _note(result: Result, text: str) -> None:
    result.note = f"{result.note}; {text}" if result.note else text


async def _datasets(
    services: Services, workdir: Path, count: int, rooms: list[int], args: argparse.Namespace, *, keep_values: bool = False
) -> list[tuple[Dataset, Topic, Layout]]:
    """Generate datasets with ``rooms`` rooms each (concurrently), then load each into a fresh topic.

    ``keep_values``: the layouts keep each record's value, for the mentions app's check.
    """
    started = time.monotonic()
    generated = await asyncio.gather(*(asyncio.to_thread(generate, workdir, count, n, args.users, args.seed) for n in rooms))
    loaded = []
    for dataset in generated:
        topic = await new_topic(services, "hot" if dataset.rooms == 1 else "uniform")
        layout = await load(topic, dataset.records, keep_values=keep_values)
        if layout.expected() != dataset.expected:
            raise RuntimeError(f"{topic.name}: the loaded records are not the generated ones")
        _say(f"loaded {count:,} events ({dataset.rooms} room(s)) into {topic.name}")
        loaded.append((dataset, topic, layout))
    _say(f"generating and loading took {time.monotonic() - started:.0f} s")
    return loaded


async def _main(args: argparse.Namespace, plan: Plan, services: Services, workdir: Path) -> tuple[list[Result], dict[str, float]]:
    task = asyncio.current_task()
    if task is not None:
        # A background job ignores SIGINT: take both, and cancel, so that every scenario's
        # cleanup runs (workers stopped, databases dropped).
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    started = await asyncio.to_thread(startup_ms, startup_runs(plan))
    results: list[Result] = []
    loaded = await _datasets(services, workdir, plan.events, [args.rooms] if plan.quick else [args.rooms, 1], args, keep_values=True)
    dataset, topic, layout = loaded[0]
    results.append(_report(await ceiling(topic, plan.events, runs=1 if plan.quick else 3, max_records=plan.max_records)))
    results.append(_report(await naive(topic, plan.events, workdir, cap_s=plan.naive_s, max_records=plan.max_records)))

    runs = [Scenario(SQLITE_X1, topic, layout, "sqlite", 1, cap_s=plan.cap_s)]
    if plan.postgres:
        runs.append(Scenario(POSTGRES_X1, topic, layout, "postgres", 1, cap_s=plan.cap_s))
        runs.append(Scenario(BOTH_X1, topic, layout, "postgres", 1, cap_s=plan.cap_s, handlers=BOTH))
        if not plan.quick:
            runs.append(Scenario(BOTH_X3, topic, layout, "postgres", 3, cap_s=plan.cap_s, handlers=BOTH))
    for scenario in runs:
        recorder = profile.attach(args.profile, "sqlite-x1") if scenario.name == SQLITE_X1 and args.profile is not None else None
        results.append(_report(await run_scenario(scenario, services, workdir, on_started=recorder)))
        if recorder is not None:
            _say(profile.finish(recorder))

    if not plan.quick:
        _, hot_topic, hot_layout = loaded.pop()
        label, backend = ("PostgreSQL", "postgres") if plan.postgres else ("SQLite", "sqlite")
        result = await run_scenario(Scenario(hot_name(label), hot_topic, hot_layout, backend, 1, cap_s=plan.cap_s), services, workdir)
        _note(result, f"every event in one room, so one partition and one counter key; compare with {uniform_name(label)}")
        results.append(_report(result))

    maximum = rate_of(results, SQLITE_X1)
    if not plan.quick and maximum:
        result = await steady(services, dataset, maximum / 2, plan.steady_s, workdir)
        _note(result, f"events/s is the offered load, half of {SQLITE_X1}'s rate; latency = record timestamp -> database commit")
        results.append(_report(result))

    results.append(_report(await _replay(services, workdir, plan, dataset, topic, layout, maximum)))
    if plan.long:
        del dataset, layout, loaded
        results += await _long(args, services, workdir, plan)
    return results, started


async def _replay(
    services: Services, workdir: Path, plan: Plan, dataset: Dataset, topic: Topic, layout: Layout, rate: float | None
) -> Result:
    """`rc-worker replay` over a topic it can finish within the cap at about the worker's rate."""
    count = plan.events if rate is None else max(min(plan.events, 1000), min(plan.events, int(rate * plan.cap_s * 0.6)))
    if count < plan.events:
        topic = await new_topic(services, "replay")
        layout = await load(topic, dataset.records[:count])
        _say(f"loaded the first {count:,} events into {topic.name} for the replay")
    result = await replay(services, topic, layout, workdir, cap_s=plan.cap_s * 2)
    _note(result, "`rc-worker replay --from-beginning`, message-count, into a fresh SQLite database")
    return result


async def _long(args: argparse.Namespace, services: Services, workdir: Path, plan: Plan) -> list[Result]:
    """One SQLite worker over 100,000 then 1,000,000 events: peak RSS and whether throughput stays flat."""
    found: list[Result] = []
    small: float | None = None
    small_count, large_count = LONG_COUNTS
    for count in LONG_COUNTS:
        [(dataset, topic, layout)] = await _datasets(services, workdir, count, [args.rooms], args)
        del dataset  # the layout is all the check needs; a million records weigh on the bench's own memory
        scenario = Scenario(f"long {count:,}, SQLite x1", topic, layout, "sqlite", 1, cap_s=LONG_CAP_S)
        result = await run_scenario(scenario, services, workdir)
        result.extra["long"] = True
        if count == small_count:
            small = result.rate
        elif result.rate and small:
            result.extra["flatness"] = result.rate / small
            _note(result, f"throughput {result.extra['flatness']:.2f} x the {small_count:,}-event run ({large_count:,} here)")
        found.append(_report(result))
    return found


def startup_runs(plan: Plan) -> int:
    """How many fresh processes of each quick command the start-up median is taken over."""
    return 1 if plan.quick else 10


def _plan(args: argparse.Namespace) -> Plan:
    # --quick: enough events for several units. A unit takes up to a batch of each partition
    # (3,000 events over six), and a topic that one unit takes whole has no rate to poll.
    events = args.events or (10_000 if args.quick else 200_000)
    if events < 100:
        raise ConfigError("--events must be at least 100")
    max_records = load_settings(ROOT / "config.yaml").kafka.max_batch_records
    naive_s = args.naive_seconds if args.naive_seconds is not None else (3.0 if args.quick else 20.0)
    cap_s = args.cap_seconds if args.cap_seconds is not None else (15.0 if args.quick else 45.0)
    return Plan(events, args.quick, args.long, not args.skip_postgres, naive_s, args.steady_seconds, cap_s, max_records)


def _config(plan: Plan, services: Services) -> dict[str, object]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip())
    return {
        "events": plan.events,
        "quick": plan.quick,
        "long": plan.long,
        "postgres": plan.postgres,
        "naive_cap_s": plan.naive_s,
        "scenario_cap_s": plan.cap_s,
        "max_batch_records": plan.max_records,
        "kafka": services.kafka,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "commit": commit + ("+dirty" if dirty else ""),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the table goes to stdout, progress to stderr."""
    args = _parser().parse_args(argv)
    try:
        plan = _plan(args)
        services = find_services(postgres=plan.postgres)
    except (ConfigError, ServiceError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="rc-bench-"))
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        results, started_ms = asyncio.run(_main(args, plan, services, workdir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            try:
                asyncio.run(delete_created_topics())
            except BrokerError as exc:
                print(f"bench: warning: {exc}; delete the bench-* topics by hand", file=sys.stderr)
            with contextlib.suppress(OSError):
                shutil.rmtree(workdir)
    print(table(results))
    print("\n" + startup_text(started_ms, startup_runs(plan)))
    print("\ntargets of issue 14 (a miss does not fail the benchmark; lost or doubled counts do):")
    print(targets_text(targets(results)))
    print(
        f"\n{plan.events:,} events, {os.cpu_count()} CPUs, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, "
        f"{time.monotonic() - started:.0f} s in all" + (f"; logs in {workdir}" if args.keep else "")
    )
    if args.out is not None:
        save(args.out, {**_config(plan, services), "startup_ms": started_ms}, results)
    failed = [r.scenario for r in results if r.failed]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
