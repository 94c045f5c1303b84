"""What each scenario measured, the table printed from it, and the JSON saved next to it."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CEILING = "raw aiokafka consume (ceiling)"
NAIVE = "naive per-event SQLAlchemy (SQLite)"
SQLITE_X1 = "rc-worker SQLite x1"
POSTGRES_X1 = "rc-worker PostgreSQL x1"
BOTH_X1 = "PostgreSQL x1, message-count + mentions"
BOTH_X3 = "PostgreSQL x3, message-count + mentions"
REPLAY = "rc-worker replay, SQLite"


def hot_name(backend: str) -> str:
    """The hot-partition scenario (every event in one room) on one worker of ``backend``."""
    return f"one hot partition, {backend} x1"


def uniform_name(backend: str) -> str:
    """The six-partition scenario the hot partition is compared with."""
    return POSTGRES_X1 if backend == "PostgreSQL" else SQLITE_X1


@dataclass(slots=True)
class Result:
    """One scenario's measurements; ``exact`` None where no counters are kept (the ceiling)."""

    scenario: str
    events: int
    rate: float | None = None  # events/s, from the first record processed to the last
    exact: bool | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: list[float] = field(default_factory=list)  # one per worker process
    seconds: float = 0.0  # wall time of the scenario, start-up and checks included
    note: str = ""
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Lost or doubled counts, or the scenario could not finish."""
        return self.error is not None or self.exact is False


def percentile(values: list[float], fraction: float) -> float | None:
    """The ``fraction`` quantile (nearest rank), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def rate_of(results: list[Result], scenario: str) -> float | None:
    """The measured rate of ``scenario`` in this run, if it ran."""
    return next((r.rate for r in results if r.scenario == scenario and r.rate), None)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _counts(result: Result) -> str:
    counts = {True: "exact", False: "FAIL: counts differ", None: "n/a"}[result.exact]
    if result.error is None:
        return counts
    error = result.error if len(result.error) <= 70 else result.error[:67] + "..."
    return f"exact, but FAIL: {error}" if result.exact else f"FAIL: {error}"


def table(results: list[Result]) -> str:
    """The benchmark's one table, ratios taken against this run's ceiling and naive rates."""
    ceiling = rate_of(results, CEILING)
    naive = rate_of(results, NAIVE)
    header = (
        "scenario",
        "events",
        "events/s",
        "x ceiling",
        "x naive",
        "CPU us/event",
        "conflicts/1k",
        "RT/unit",
        "p50 ms",
        "p99 ms",
        "peak RSS MB/worker",
        "counts",
    )
    rows = [header]
    for r in results:
        compared = r.rate if not r.extra.get("offered") else None  # an offered load is no throughput
        rows.append(
            (
                r.scenario + (" *" if r.note else ""),
                f"{r.events:,}",
                _fmt(r.rate, ",.0f"),
                _fmt(compared / ceiling if compared and ceiling else None, ".3f"),
                _fmt(compared / naive if compared and naive else None, ".1f"),
                _fmt(r.extra.get("cpu_us_per_event"), ",.0f"),
                _fmt(r.extra.get("conflicts_per_1k"), ".1f"),
                _fmt(r.extra.get("round_trips_per_unit"), ".1f"),
                _fmt(r.p50_ms, ".1f"),
                _fmt(r.p99_ms, ".1f"),
                " / ".join(f"{m:.0f}" for m in r.peak_rss_mb) or "-",
                _counts(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = set(range(1, len(header) - 2))

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(cells) + " |"

    out = [line(header), "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"]
    out += [line(row) for row in rows[1:]]
    notes = [f"* {r.scenario}: {r.note}" for r in results if r.note]
    return "\n".join(out + ([""] if notes else []) + notes)


@dataclass(frozen=True, slots=True)
class Target:
    """One target of issue 14 and whether this run meets it."""

    what: str
    met: bool | None  # None: not measured in this run
    measured: str


def _at_least(what: str, value: float | None, floor: float, spec: str = ".2f") -> Target:
    if value is None:
        return Target(what, None, "not measured")
    return Target(what, value >= floor, format(value, spec))


def _at_most(what: str, value: float | None, ceiling: float, spec: str = ".2f", unit: str = "") -> Target:
    if value is None:
        return Target(what, None, "not measured")
    return Target(what, value <= ceiling, format(value, spec) + unit)


def _extra(results: list[Result], scenario: str, name: str) -> float | None:
    value = next((r.extra.get(name) for r in results if r.scenario == scenario), None)
    return float(value) if value is not None else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(results: list[Result]) -> list[Target]:
    """Issue 14's targets, judged on this run's numbers (a miss does not fail the benchmark)."""
    ceiling = rate_of(results, CEILING)
    both_1, both_3 = rate_of(results, BOTH_X1), rate_of(results, BOTH_X3)
    cpu_1, cpu_3 = _extra(results, BOTH_X1, "cpu_us_per_event"), _extra(results, BOTH_X3, "cpu_us_per_event")
    found = [
        _at_least("SQLite x1 >= 0.5 x raw consume (floor 0.2)", _ratio(rate_of(results, SQLITE_X1), ceiling), 0.5, ".3f"),
        _at_least("PostgreSQL x1 >= 0.4 x raw consume", _ratio(rate_of(results, POSTGRES_X1), ceiling), 0.4, ".3f"),
        _at_least("both handlers: PostgreSQL x3 >= 1.5 x x1 events/s", _ratio(both_3, both_1), 1.5),
        _at_most("both handlers: CPU/event at x3 <= 1.3 x that at x1", _ratio(cpu_3, cpu_1), 1.3),
        _at_most("both handlers: one worker's CPU/event <= 100 us", cpu_1, 100, ",.0f", " us"),
    ]
    hot = next((r for r in results if r.scenario.startswith("one hot partition")), None)
    uniform = rate_of(results, uniform_name("PostgreSQL" if hot is not None and "PostgreSQL" in hot.scenario else "SQLite"))
    found.append(_at_least("hot partition x1 >= 0.5 x the six-partition x1 rate", _ratio(hot.rate if hot else None, uniform), 0.5))
    steady = next((r for r in results if r.scenario.startswith("steady")), None)
    found.append(_at_most("steady half-load p99 < 250 ms", steady.p99_ms if steady else None, 250, ".0f", " ms"))
    found.append(_at_most("steady half-load p50 < 50 ms", steady.p50_ms if steady else None, 50, ".0f", " ms"))
    for r in results:
        # The larger of the two --long runs: the one compared with the smaller.
        if r.extra.get("flatness") is not None:
            flat = abs(r.extra["flatness"] - 1) <= 0.15
            found.append(Target(f"{r.scenario}: events/s within 15% of the 100,000-event run", flat, f"{r.extra['flatness']:.2f}"))
            if r.peak_rss_mb:
                found.append(_at_most(f"{r.scenario}: peak RSS < 200 MB", max(r.peak_rss_mb), 200, ".0f", " MB"))
    return found


def targets_text(found: list[Target]) -> str:
    """The targets as lines: met, MISSED, or not measured."""
    label = {True: "met   ", False: "MISSED", None: "n/a   "}
    return "\n".join(f"  {label[t.met]}  {t.what}: {t.measured}" for t in found)


def save(path: Path, config: dict[str, Any], results: list[Result]) -> None:
    """Write the configuration, every result and the targets as JSON."""
    ceiling, naive = rate_of(results, CEILING), rate_of(results, NAIVE)
    items = []
    for r in results:
        item = asdict(r)
        item["x_ceiling"] = r.rate / ceiling if r.rate and ceiling else None
        item["x_naive"] = r.rate / naive if r.rate and naive else None
        items.append(item)
    document = {"config": config, "results": items, "targets": [asdict(t) for t in targets(results)]}
    path.write_text(json.dumps(document, indent=2) + "\n")


def median(values: list[float]) -> float:
    """The median of ``values`` (the ceiling is measured a few times)."""
    return statistics.median(values)


# Issue 19: `rc-worker --help`, `check-config` and `handlers` start and exit within this.
STARTUP_TARGET_S = 0.25


def startup_text(found: dict[str, float], runs: int) -> str:
    """One line per command: its median start-to-exit time, and whether it meets the target."""
    lines = [f"start-up, median wall time to exit of {runs} fresh process(es) (issue 19: under {STARTUP_TARGET_S:.2f} s):"]
    for command, ms in found.items():
        lines.append(f"  {'met   ' if ms < STARTUP_TARGET_S * 1000 else 'MISSED'}  {command}: {ms / 1000:.3f} s")
    return "\n".join(lines)
