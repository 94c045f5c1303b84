"""The data tools' progress: a bar on a terminal, log lines elsewhere, nothing when quiet."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from tests.support import ROOT, on_terminal
from worker.tools import progress

DRIVER = [sys.executable, "-m", "tests.drivers.progress_task"]
# Every escape sequence and carriage return a bar or a colour would write.
CONTROL = re.compile(r"[\r\x1b\x08]")


def driver_env() -> dict[str, str]:
    """The environment of a driver process, without anything that would change its display."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RC_WORKER_")} | {"TERM": "xterm"}


@pytest.fixture
def log_display(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Progress as log lines, one on every advance, for this test only."""
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    before = progress.display()
    progress.configure("log")
    yield
    progress.configure(before)


class TestChoice:
    def test_quiet_shows_no_progress(self) -> None:
        """--quiet turns the display off whatever stderr is."""
        assert progress.choose(quiet=True, log_format="console") == "off"

    def test_a_terminal_gets_a_bar_unless_logs_are_json(self) -> None:
        """A terminal gets a bar; with JSON logs it gets log lines, which a bar would garble."""
        leader, follower = pty.openpty()
        with os.fdopen(follower, "w") as terminal:
            assert progress.choose(quiet=False, log_format="console", stream=terminal) == "bar"
            assert progress.choose(quiet=False, log_format="json", stream=terminal) == "log"
        os.close(leader)

    def test_a_pipe_gets_log_lines(self) -> None:
        """A pipe (CI, a log collector) gets log lines."""
        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "w") as pipe:
            assert progress.choose(quiet=False, log_format="console", stream=pipe) == "log"
        os.close(read_end)


class TestLogLines:
    def test_a_line_says_done_of_total_rate_eta_and_each_partition(self, log_display: None) -> None:
        """Each progress line has the counts so far, a rate, an ETA, and done/total per partition."""
        with capture_logs() as logs, progress.Progress("replay", 10, unit="events", partitions={0: 4, 1: 6}) as task:
            task.advance(3, partition=1, duplicates=1)
            task.advance(4, partition=0, dead_letters=2)
        lines = [line for line in logs if line["event"] == "progress"]
        assert [line["done"] for line in lines] == [0, 3, 7, 7]
        middle = lines[1]
        assert (middle["task"], middle["total"], middle["unit"], middle["duplicates"]) == ("replay", 10, "events", 1)
        assert middle["per_s"] > 0
        assert middle["eta_s"] is not None
        assert lines[-1]["partitions"] == {"0": [4, 4], "1": [3, 6]}
        assert (lines[-1]["dead_letters"], lines[-1]["finished"]) == (2, True)

    def test_a_task_that_fails_says_so_in_its_last_line(self, log_display: None) -> None:
        """The last line of a task that raised says finished: false."""
        with capture_logs() as logs:
            task = progress.Progress("dump", 5)
            task.__enter__()
            task.advance(1)
            task.__exit__(RuntimeError, RuntimeError("broker gone"), None)
        assert logs[-1]["finished"] is False

    def test_a_replay_group_member_grows_its_total_as_it_is_assigned(self, log_display: None) -> None:
        """resize adds the partitions a member is given, each with what is left of it."""
        with capture_logs() as logs, progress.Progress("replay", 0) as task:
            task.resize({0: 5, 3: 7})
            task.advance(5, partition=0)
        assert (logs[-1]["done"], logs[-1]["total"]) == (5, 12)

    def test_quiet_logs_nothing(self) -> None:
        """With the display off, a task logs no progress."""
        before = progress.display()
        progress.configure("off")
        try:
            with capture_logs() as logs, progress.Progress("load", 3) as task:
                task.advance(3)
        finally:
            progress.configure(before)
        assert logs == []


class TestOnATerminal:
    def test_the_bar_shows_a_count_a_rate_an_eta_and_the_tallies(self) -> None:
        """On a pseudo-terminal the display shows done of total, events/s, an ETA, dead letters, duplicates, partitions done."""
        status, output = on_terminal([*DRIVER, "--units", "60"], driver_env(), timeout=60)
        assert status == 0, output
        assert "60/60" in output
        assert re.search(r"\d+(\.\d+)? events/s", output), output
        assert re.search(r"ETA \d\d:\d\d", output), output
        assert "dead letters 3, duplicates 6, partitions 2/2 done" in output
        assert "done 60" in output

    def test_json_logs_on_a_terminal_get_lines_not_a_bar(self) -> None:
        """--log-format json on a terminal: progress log lines, no bar drawn over them."""
        status, output = on_terminal([*DRIVER, "--units", "20", "--log-format", "json"], driver_env(), timeout=60)
        assert status == 0, output
        assert "events/s" not in output
        assert "\x1b" not in output
        lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
        assert [line["done"] for line in lines if line["event"] == "progress"][-1] == 20


class TestOffATerminal:
    def test_a_pipe_gets_structured_lines_and_no_control_characters(self) -> None:
        """Piped, the task writes JSON progress lines, the last one complete, and not one control character."""
        result = subprocess.run(
            [*DRIVER, "--units", "30"], env=driver_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
        )
        assert not CONTROL.search(result.stdout + result.stderr)
        lines = [json.loads(line) for line in result.stderr.splitlines()]
        assert {line["event"] for line in lines} == {"progress"}
        assert (lines[0]["done"], lines[-1]["done"], lines[-1]["total"], lines[-1]["duplicates"]) == (0, 30, 30, 3)

    def test_quiet_writes_only_the_result(self) -> None:
        """--quiet: nothing on stderr, the result on stdout."""
        result = subprocess.run(
            [*DRIVER, "--units", "10", "--quiet"], env=driver_env(), cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
        )
        assert (result.stdout, result.stderr) == ("done 10\n", "")
