"""How far a long data tool is: a live display for a person, a periodic log line for a machine.

``rc-worker replay``, ``load``, ``dump``, ``dlq`` and ``offsets reset`` report what they have
done to a :class:`Progress`. What it shows is decided once, by the CLI, from where stderr goes
(:func:`choose`): on a terminal a tqdm bar (done of total, events/s, ETA, dead letters and
duplicates so far); elsewhere (a pipe, CI, ``--log-format json``) a ``progress`` log line
every LOG_INTERVAL_S and one at the end, since a bar's carriage returns would only garble a
log file; nothing with ``--quiet``. The final summary is the command's own and printed as
before. tqdm is imported only when a bar is drawn, so no other command pays for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal

from worker import logs

if TYPE_CHECKING:
    from tqdm import tqdm


Display = Literal["bar", "log", "off"]

# Off a terminal, a progress line this often: often enough to see a tool move, rare enough to read.
LOG_INTERVAL_S = 5.0
# The bar is redrawn at most this often; each redraw is a write to the terminal.
BAR_INTERVAL_S = 0.2
# "replay:  42%|████▏     | 42000/100000 [00:21, ETA 00:29, 1998.91 events/s, dead letters 3, duplicates 0]"
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}, ETA {remaining}, {rate_fmt}{postfix}]"

_display: Display = "log"


def choose(*, quiet: bool, log_format: str, stream: IO[str] | None = None) -> Display:
    """The display for a command: off when quiet, a bar on a terminal unless logs are JSON, else log lines."""
    if quiet:
        return "off"
    stream = stream or sys.stderr
    return "bar" if log_format != "json" and stream.isatty() else "log"


def configure(display: Display) -> None:
    """Set the display every :class:`Progress` of this process uses (the CLI calls this once)."""
    global _display  # one process-wide choice, made by the CLI before any tool runs
    _display = display


def display() -> Display:
    """The display chosen by :func:`configure`."""
    return _display


class Progress:
    """The progress of one task over ``total`` units, by partition where the task has them.

    Use as a context manager; :meth:`advance` after each piece of work. The bar, if any, stays
    on screen when the task ends, with its final count and rate.
    """

    def __init__(self, task: str, total: int, *, unit: str = "records", partitions: Mapping[int, int] | None = None) -> None:
        self.task = task
        self.total = total
        self.unit = unit
        self.done = 0
        self.dead_letters = 0
        self.duplicates = 0
        self.partition_totals = dict(partitions or {})
        self.partition_done = dict.fromkeys(self.partition_totals, 0)
        self.started = time.monotonic()
        self._next_log = self.started + LOG_INTERVAL_S
        self._display = _display
        self._bar: tqdm[Any] | None = self._open_bar() if self._display == "bar" else None

    def _open_bar(self) -> tqdm[Any]:
        from tqdm import tqdm

        bar: tqdm[Any] = tqdm(
            total=self.total,
            desc=self.task,
            unit=f" {self.unit}",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=BAR_INTERVAL_S,
            bar_format=BAR_FORMAT,
            leave=True,
        )
        # Log lines written meanwhile clear the bar first and redraw it after.
        logs.console.around_write = lambda: tqdm.external_write_mode(file=sys.stderr)
        return bar

    def __enter__(self) -> Progress:
        if self._display == "log":
            self._log()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(finished=exc_type is None)

    @property
    def rate(self) -> float:
        """Units per second since the task began."""
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the rate so far; None before anything is done."""
        rate = self.rate
        return max(0.0, (self.total - self.done) / rate) if rate > 0 else None

    def advance(self, count: int, *, partition: int | None = None, dead_letters: int = 0, duplicates: int = 0) -> None:
        """``count`` more units done (of ``partition``), with the dead letters and duplicates among them."""
        self.done += count
        self.dead_letters += dead_letters
        self.duplicates += duplicates
        if partition is not None:
            self.partition_done[partition] = self.partition_done.get(partition, 0) + count
        if self._bar is not None:
            self._bar.set_postfix_str(self._tallies(), refresh=False)
            self._bar.update(count)
        elif self._display == "log" and time.monotonic() >= self._next_log:
            self._log()

    def _tallies(self) -> str:
        text = f"dead letters {self.dead_letters}, duplicates {self.duplicates}"
        if len(self.partition_totals) > 1:
            finished = sum(1 for p, total in self.partition_totals.items() if self.partition_done[p] >= total)
            text += f", partitions {finished}/{len(self.partition_totals)} done"
        return text

    def resize(self, remaining: Mapping[int, int]) -> None:
        """Partitions taken on (a replay group's assignment), each with ``remaining`` units to go."""
        for partition, count in remaining.items():
            self.partition_done.setdefault(partition, 0)
            self.partition_totals[partition] = self.partition_done[partition] + count
        self.total = sum(self.partition_totals.values())
        if self._bar is not None:
            self._bar.total = self.total
            self._bar.refresh()

    def close(self, *, finished: bool = True) -> None:
        """End the display: the bar's last state stays on screen; off a terminal, one last line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            logs.console.around_write = None
        elif self._display == "log":
            self._log(finished=finished)
        self._display = "off"

    def _log(self, finished: bool | None = None) -> None:
        now = time.monotonic()
        self._next_log = now + LOG_INTERVAL_S
        eta = self.eta_s
        fields: dict[str, Any] = {
            "task": self.task,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "percent": round(100 * self.done / self.total, 1) if self.total else 100.0,
            "per_s": round(self.rate, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "elapsed_s": round(now - self.started, 1),
            "dead_letters": self.dead_letters,
            "duplicates": self.duplicates,
        }
        if len(self.partition_totals) > 1:
            fields["partitions"] = {str(p): [self.partition_done[p], t] for p, t in sorted(self.partition_totals.items())}
        if finished is not None:
            fields["finished"] = finished
        logs.get_logger("worker.progress").info("progress", **fields)
