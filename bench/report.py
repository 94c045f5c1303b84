"""What each scenario measured, the table printed from it, and the JSON saved next to it."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CEILING = "raw aiokafka consume (ceiling)"
NAIVE = "naive per-event SQLAlchemy (SQLite)"
HOT_KEY = "hot key, PostgreSQL x4"


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
    header = ("scenario", "events", "events/s", "x ceiling", "x naive", "p50 ms", "p99 ms", "peak RSS MB/worker", "counts")
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
                _fmt(r.p50_ms, ".1f"),
                _fmt(r.p99_ms, ".1f"),
                " / ".join(f"{m:.0f}" for m in r.peak_rss_mb) or "-",
                _counts(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {1, 2, 3, 4, 5, 6}

    def line(row: tuple[str, ...]) -> str:
        cells = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(cells) + " |"

    out = [line(header), "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths)) + "|"]
    out += [line(row) for row in rows[1:]]
    notes = [f"* {r.scenario}: {r.note}" for r in results if r.note]
    return "\n".join(out + ([""] if notes else []) + notes)


@dataclass(frozen=True, slots=True)
class Target:
    """One target of issue 8 and whether this run meets it."""

    what: str
    met: bool | None  # None: not measured in this run
    measured: str


def _ratio_target(what: str, value: float | None, floor: float, spec: str = ".2f") -> Target:
    if value is None:
        return Target(what, None, "not measured")
    return Target(what, value >= floor, format(value, spec))


def targets(results: list[Result]) -> list[Target]:
    """Issue 8's targets, judged on this run's numbers (a miss does not fail the benchmark)."""
    by_name = {r.scenario: r for r in results}
    ceiling, naive = rate_of(results, CEILING), rate_of(results, NAIVE)

    def ratio(scenario: str, base: float | None) -> float | None:
        rate = rate_of(results, scenario)
        return rate / base if rate and base else None

    found = [
        _ratio_target("SQLite, 1 worker >= 0.5 x ceiling", ratio("rc-worker SQLite x1", ceiling), 0.5),
        _ratio_target("SQLite, 1 worker >= 30 x naive", ratio("rc-worker SQLite x1", naive), 30, ".1f"),
        _ratio_target("PostgreSQL, 1 worker >= 0.4 x ceiling", ratio("rc-worker PostgreSQL x1", ceiling), 0.4),
    ]
    hot, uniform = by_name.get(HOT_KEY), rate_of(results, "rc-worker PostgreSQL x4")
    if hot is not None and hot.rate and uniform:
        found.append(
            Target("hot key x4 exact and >= 0.3 x uniform x4", bool(hot.exact) and hot.rate / uniform >= 0.3, f"{hot.rate / uniform:.2f}")
        )
    else:
        found.append(Target("hot key x4 exact and >= 0.3 x uniform x4", None, "not measured"))
    steady = [r for r in results if r.scenario.startswith("steady")]
    if steady and steady[0].p99_ms is not None:
        found.append(Target("steady half-load p99 < 250 ms", steady[0].p99_ms < 250, f"{steady[0].p99_ms:.0f} ms"))
    else:
        found.append(Target("steady half-load p99 < 250 ms", None, "not measured"))
    for r in results:
        # The larger of the two --long runs: the one compared with the smaller.
        if r.extra.get("flatness") is not None:
            flat = abs(r.extra["flatness"] - 1) <= 0.2
            found.append(Target(f"{r.scenario}: throughput within 20% of the smaller run", flat, f"{r.extra['flatness']:.2f}"))
            if r.peak_rss_mb:
                found.append(Target(f"{r.scenario}: peak RSS < 200 MB", max(r.peak_rss_mb) < 200, f"{max(r.peak_rss_mb):.0f} MB"))
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
