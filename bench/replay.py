"""`rc-worker replay` over the benchmark's topic into a fresh database, and its rate.

The replay process stops by itself at the end of the topic; its rate is taken as the
workers' is, from the global counter polled in its database (so start-up and planning are
left out), and its counters must be exactly those of the whole topic.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.dataset import ROOT, Layout, Topic
from bench.report import REPLAY, Result
from bench.services import Services, open_store
from bench.workers import (
    APP,
    ScenarioError,
    WorkerProcess,
    check_counts,
    cost,
    fresh_database,
    stop_workers,
    wait_for_count,
    worker_env,
)


def start_replay(topic: Topic, database_url: str, logdir: Path) -> WorkerProcess:
    """`rc-worker replay --from-beginning` of ``topic`` through message-count into ``database_url``."""
    env = worker_env(topic, f"bench-unused-{uuid.uuid4().hex[:8]}", database_url)
    log_path = logdir / "replay.log"
    command = [
        sys.executable,
        "-m",
        "worker",
        "replay",
        "--from-beginning",
        "--topic",
        topic.name,
        "--handlers",
        APP,
        "--state",
        database_url,
    ]
    with log_path.open("wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=handle, cwd=ROOT)
    return WorkerProcess(process, log_path)


async def replay(services: Services, topic: Topic, layout: Layout, workdir: Path, *, cap_s: float) -> Result:
    """Replay the whole topic on SQLite; the rate, CPU per event, and whether every count is exact."""
    started = time.monotonic()
    result = Result(REPLAY, layout.total)
    workers: list[WorkerProcess] = []
    try:
        async with fresh_database("sqlite", services, workdir) as database:
            store = open_store(database.url)
            try:
                workers = [start_replay(topic, database.url, workdir)]
                progress = await wait_for_count(store, layout.total, workers, cap_s=cap_s, exits=True)
                result.rate = progress.rate()
                result.peak_rss_mb = [m for m in (w.peak_rss_mb() for w in workers) if m is not None]
                if progress.capped:
                    raise ScenarioError(
                        f"the replay had not finished {cap_s:.0f} s after it began: {progress.done_count} of {layout.total}"
                    )
                code = workers[0].process.wait(timeout=60)
                result.exact, result.events = await check_counts(store, layout, None, topic.name, complete=True)
                result.extra = {"exit_codes": [code], **cost(progress, workers)}
                if code != 0:
                    result.error = f"replay exit status {code}: {workers[0].last_words()}"
            finally:
                stop_workers(workers)
                await store.close()
    except (ScenarioError, subprocess.TimeoutExpired) as exc:
        result.error = str(exc)
    finally:
        result.seconds = time.monotonic() - started
    return result


def startup_ms(runs: int = 5) -> dict[str, float]:
    """The median wall time of `rc-worker --help`, `check-config` and `handlers`, start to exit."""
    beside = Path(sys.executable).with_name("rc-worker")
    program = [str(beside)] if beside.exists() else [sys.executable, "-m", "worker"]
    env = {"RC_WORKER_CONFIG": str(ROOT / "config.yaml"), "PATH": str(Path(sys.executable).parent)}
    found: dict[str, float] = {}
    for args in (["--help"], ["check-config"], ["handlers"]):
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            subprocess.run([*program, *args], env=env, cwd=ROOT, capture_output=True, timeout=60, check=True)
            times.append((time.perf_counter() - began) * 1000)
        found["rc-worker " + " ".join(args)] = sorted(times)[len(times) // 2]
    return found
