"""Optional: sample one worker with py-spy while it runs, and summarise where its time goes.

py-spy writes collapsed stacks ("frame;frame;... count", loadable into speedscope or
flamegraph.pl); the summary leaves out samples of threads that only wait, and adds up the
rest per function, by own time (on top of the stack) and by total time (anywhere on it).
``python -m bench.profile FILE`` summarises a file recorded earlier.
"""

from __future__ import annotations

import linecache
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.workers import WorkerProcess, py_spy

# Samples per second: py-spy's default; it pauses the worker briefly for each one.
RATE = 100
_LINE = re.compile(r":\d+\)$")
_FRAME = re.compile(r"^.* \((?P<path>[^():]+):(?P<line>\d+)\)$")
_WAITS = {"Condition.wait", "Event.wait", "Semaphore.acquire"}
_PROJECT = ("worker/", "handlers/")


@dataclass(slots=True)
class Recorder:
    """A py-spy recording of the first worker of a scenario; pass it as the scenario's hook."""

    directory: Path
    name: str
    process: subprocess.Popen[bytes] | None = None
    error: str | None = None
    output: Path = field(init=False)

    def __post_init__(self) -> None:
        self.output = self.directory / f"{self.name}.collapsed.txt"

    def __call__(self, workers: list[WorkerProcess]) -> None:
        executable = py_spy()
        if executable is None:
            self.error = "py-spy is not installed (.venv/bin/pip install py-spy)"
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            executable,
            "record",
            "--pid",
            str(workers[0].process.pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "-o",
            str(self.output),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def attach(directory: Path, name: str) -> Recorder:
    """A recorder that starts sampling when the scenario's workers have started."""
    return Recorder(directory, name)


def _source_line(frame: str) -> str:
    """The source text of a ``func (path:line)`` frame, looked up on sys.path ('' if not found)."""
    match = _FRAME.match(frame)
    if match is None:
        return ""
    for base in (Path.cwd(), *map(Path, sys.path)):
        candidate = base / match["path"]
        if candidate.is_file():
            return linecache.getline(str(candidate), int(match["line"]))
    return ""


def _idle(frame: str) -> bool:
    """Whether a sample whose innermost frame is ``frame`` is a thread waiting, not working.

    py-spy counts these waits as active: the event loop in its selector (waiting for I/O)
    and aiosqlite's connection threads blocked on their queue (waiting for work).
    """
    function = frame.split(" (", 1)[0]
    if "selectors.py:" in frame or (function in _WAITS and "threading.py:" in frame):
        return True
    return function == "_connection_worker_thread" and ".get(" in _source_line(frame)


def summarise(path: Path, top: int = 10) -> str:
    """Where the sampled time went: busy share per thread kind, top functions by own and total time.

    Own time goes to the innermost frame of each busy sample; total time to every frame of
    it once; the total-time list keeps to the project's code (worker/, handlers/), since
    interpreter and event-loop frames are on every stack.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = idle = threads = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count, raw = int(count_text), stack.split(";")
        samples += count
        if _idle(raw[-1]):
            idle += count
            continue
        if raw[0].startswith("Thread._bootstrap"):
            threads += count
        frames = [_LINE.sub(")", frame) for frame in raw]
        own[frames[-1]] += count
        for frame in set(frames):
            if frame.split(" (", 1)[-1].startswith(_PROJECT):
                total[frame] += count
    busy = samples - idle
    if not busy:
        return f"{path}: no busy samples"

    def rows(counter: Counter[str]) -> list[str]:
        return [f"  {100 * n / busy:5.1f}%  {frame}" for frame, n in counter.most_common(top)]

    threads_share = f"{100 * threads / busy:.0f}% in other threads (aiosqlite's: the SQL itself)"

    return "\n".join(
        [
            f"{samples} samples in {path}; {100 * idle / samples:.0f}% waiting (event loop in select, database threads idle)",
            f"busy samples: {busy}, {100 * (busy - threads) / busy:.0f}% in the event-loop thread, {threads_share}",
            f"top {top} by own time (% of busy samples):",
            *rows(own),
            f"top {top} of the project's functions by total time (% of busy samples):",
            *rows(total),
        ]
    )


def finish(recorder: Recorder, timeout_s: float = 60) -> str:
    """Wait for py-spy (it stops when the worker exits) and return the summary or what went wrong."""
    if recorder.process is None:
        return f"profile: {recorder.error}"
    try:
        _, stderr = recorder.process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        recorder.process.kill()
        recorder.process.communicate()
        return "profile: py-spy did not stop after the worker exited"
    if not recorder.output.exists():
        return f"profile: py-spy wrote nothing (exit {recorder.process.returncode}): {stderr.decode(errors='replace')[-500:]}"
    return "profile: " + summarise(recorder.output)


if __name__ == "__main__":
    print(summarise(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 10))
