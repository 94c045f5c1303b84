"""Start-up of the quick commands (issue 19): `rc-worker --help`, `check-config` and `handlers`.

Each run is a fresh process, timed from start to exit, as a person at a terminal sees it; the
median of several is reported against the 0.25 s target. A miss does not fail the benchmark.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (("--help",), ("check-config",), ("handlers",))
TARGET_S = 0.25


def startup_ms(runs: int = 10) -> dict[str, float]:
    """The median wall time, in milliseconds, of each command in :data:`COMMANDS` over ``runs`` fresh processes."""
    beside = Path(sys.executable).with_name("rc-worker")
    program = [str(beside)] if beside.exists() else [sys.executable, "-m", "worker"]
    # The repository's config and no RC_WORKER_* of the caller's, so runs compare between machines.
    env = {"RC_WORKER_CONFIG": str(ROOT / "config.yaml"), "PATH": str(Path(sys.executable).parent)}
    found: dict[str, float] = {}
    for args in COMMANDS:
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            subprocess.run([*program, *args], env=env, cwd=ROOT, capture_output=True, timeout=60, check=True)
            times.append((time.perf_counter() - began) * 1000)
        found["rc-worker " + " ".join(args)] = statistics.median(times)
    return found


def startup_text(found: dict[str, float], runs: int) -> str:
    """One line per command: its median, and whether it meets the target."""
    lines = [f"start-up of the quick commands (issue 19; median of {runs} fresh processes, target under {TARGET_S:.2f} s):"]
    for command, ms in found.items():
        lines.append(f"  {'met   ' if ms < TARGET_S * 1000 else 'MISSED'}  {command}: {ms / 1000:.3f} s")
    return "\n".join(lines)
