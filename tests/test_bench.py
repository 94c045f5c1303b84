"""The benchmark of issue 8: `python -m bench --quick` runs end to end and counts exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.dataset import TOTAL, Layout
from bench.profile import summarise
from bench.replay import startup_ms
from bench.report import CEILING, NAIVE, Result, startup_text, table
from tests.support import ROOT

QUICK_SCENARIOS = (NAIVE, "rc-worker SQLite x1", "rc-worker PostgreSQL x1")


@pytest.fixture(scope="module")
def quick_run(kafka_bootstrap: str, postgres_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One `python -m bench --quick` run: its exit status, printed table and saved JSON."""
    out = tmp_path_factory.mktemp("bench") / "results.json"
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "RC_WORKER_TEST_POSTGRES_URL": postgres_admin_url}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return {
        "code": done.returncode,
        "stdout": done.stdout,
        "stderr": done.stderr,
        "json": json.loads(out.read_text()) if out.exists() else None,
    }


@pytest.mark.slow
@pytest.mark.kafka
@pytest.mark.postgres
class TestQuickRun:
    def test_exits_zero_and_lists_every_quick_scenario_as_exact(self, quick_run: dict[str, Any]) -> None:
        """--quick exits 0 and its table shows each quick scenario with exact counts."""
        assert quick_run["code"] == 0, quick_run["stderr"][-3000:]
        rows = {
            line.split("|")[1].strip().rstrip(" *"): line.split("|")[-2].strip()
            for line in quick_run["stdout"].splitlines()
            if line.startswith("| ")
        }
        assert {name: rows.get(name) for name in QUICK_SCENARIOS} == dict.fromkeys(QUICK_SCENARIOS, "exact")

    def test_saves_ratios_taken_against_the_same_runs_ceiling(self, quick_run: dict[str, Any]) -> None:
        """The JSON holds every scenario's rate and its ratio to this run's raw consume rate."""
        results = {r["scenario"]: r for r in quick_run["json"]["results"]}
        ceiling = results[CEILING]["rate"]
        for name in QUICK_SCENARIOS:
            assert results[name]["x_ceiling"] == pytest.approx(results[name]["rate"] / ceiling)

    def test_counts_round_trips_per_unit_of_work_committed_not_per_batch(self, quick_run: dict[str, Any]) -> None:
        """RT/unit divides by the units the workers committed, which may each hold several partitions' batches."""
        results = {r["scenario"]: r for r in quick_run["json"]["results"]}
        for name in ("rc-worker SQLite x1", "rc-worker PostgreSQL x1"):
            extra = results[name]["extra"]
            assert extra["units"] > 0
            assert extra["units"] <= extra["batches"]
            assert extra["round_trips_per_unit"] == pytest.approx(extra["round_trips"] / extra["units"])


class TestTable:
    def test_lost_counts_fail_the_scenario(self) -> None:
        """A scenario whose counters differ is a failure and the table says so."""
        result = Result("rc-worker SQLite x1", 100, rate=50.0, exact=False)
        assert result.failed
        assert "FAIL: counts differ" in table([Result(CEILING, 100, rate=1000.0), result])

    def test_ratios_use_this_runs_ceiling_and_naive_rates(self) -> None:
        """x ceiling and x naive divide by the rates measured in the same list of results."""
        printed = table(
            [Result(CEILING, 100, rate=1000.0), Result(NAIVE, 10, rate=10.0, exact=True), Result("w", 100, rate=250.0, exact=True)]
        )
        row = next(line for line in printed.splitlines() if line.startswith("| w "))
        assert [cell.strip() for cell in row.split("|")[3:6]] == ["250", "0.250", "25.0"]


class TestLayout:
    def test_expected_counters_are_those_of_the_records_below_the_stored_offsets(self) -> None:
        """A worker stopped anywhere must hold exactly the counts of each partition's committed prefix."""
        layout = Layout.of([(0, 0, b"r1"), (0, 1, b"r2"), (1, 0, b"r1"), (0, 2, b"r1"), (1, 1, b"r3")])
        assert layout.expected({0: 2, 1: 1}) == {TOTAL: 3, "room:r1": 2, "room:r2": 1}
        assert layout.expected() == {TOTAL: 5, "room:r1": 3, "room:r2": 1, "room:r3": 1}

    def test_a_gap_in_the_offsets_is_refused(self) -> None:
        """Offsets must run from 0 without gaps, or the expected counters would be wrong."""
        with pytest.raises(RuntimeError, match="offset 2 where 1 was expected"):
            Layout.of([(0, 0, b"r1"), (0, 2, b"r1")])


class TestProfileSummary:
    def test_own_time_counts_the_top_frame_and_total_time_every_frame(self, tmp_path: Path) -> None:
        """Own time goes to the innermost frame only; total time to each project frame on the stack once."""
        collapsed = tmp_path / "p.txt"
        collapsed.write_text("main (worker/a.py:1);f (worker/a.py:5);g (lib/b.py:9) 3\nmain (worker/a.py:1);f (worker/a.py:6) 1\n")
        summary = summarise(collapsed, top=2).splitlines()
        assert summary[3:5] == ["   75.0%  g (lib/b.py)", "   25.0%  f (worker/a.py)"]
        assert sorted(summary[6:8]) == ["  100.0%  f (worker/a.py)", "  100.0%  main (worker/a.py)"]

    def test_an_event_loop_waiting_in_select_is_not_busy_time(self, tmp_path: Path) -> None:
        """Samples that end in the selector are the loop waiting for I/O: left out of the shares."""
        collapsed = tmp_path / "p.txt"
        collapsed.write_text("main (worker/a.py:1);f (worker/a.py:5) 1\nmain (worker/a.py:1);EpollSelector.select (selectors.py:468) 3\n")
        summary = summarise(collapsed, top=1).splitlines()
        assert "75% waiting" in summary[0]
        assert summary[3] == "  100.0%  f (worker/a.py)"


class TestStartup:
    def test_each_quick_command_gets_a_median_time(self) -> None:
        """The three commands of issue 19 are run (they must exit 0) and each gets a positive time."""
        found = startup_ms(runs=1)
        assert list(found) == ["rc-worker --help", "rc-worker check-config", "rc-worker handlers"]
        assert all(ms > 0 for ms in found.values())

    def test_the_text_says_met_or_missed_against_the_target(self) -> None:
        text = startup_text({"rc-worker --help": 40.0, "rc-worker handlers": 300.0}, runs=10)
        assert "of 10 fresh process(es) (issue 19: under 0.25 s)" in text
        assert "  met     rc-worker --help: 0.040 s" in text
        assert "  MISSED  rc-worker handlers: 0.300 s" in text
