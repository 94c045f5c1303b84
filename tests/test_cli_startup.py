"""What `rc-worker --help`, `check-config` and `handlers` import: only what they need.

Issue 19 wants these commands to start in under 0.25 s; the benchmark measures that (tests
never assert timings). What keeps it so is that they import none of the heavy libraries the
other commands use, which is checked here in a fresh interpreter, by its ``sys.modules``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT
from worker.cli import _run

# Runs the command as `python -m worker` does, then lists every module the interpreter holds.
_SCRIPT = """
import json, sys
from worker.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
print("\\n" + json.dumps({"status": status, "modules": sorted(sys.modules)}))
"""

# Kafka, database, HTTP and web libraries, structlog (whose import pulls in rich when installed),
# and asyncio: these commands await nothing, so they run without an event loop.
HEAVY = (
    "asyncio",
    "aiokafka",
    "sqlalchemy",
    "alembic",
    "asyncpg",
    "aiosqlite",
    "httpx",
    "jinja2",
    "starlette",
    "uvicorn",
    "structlog",
    "rich",
    "tqdm",
)


def imported_by(*args: str, **variables: str) -> tuple[int, set[str]]:
    """The exit status of ``rc-worker ARGS`` and the top-level packages it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RC_WORKER_")}
    env.update(RC_WORKER_CONFIG=str(ROOT / "config.yaml"), **variables)
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    last = result.stdout.strip().splitlines()[-1]
    found = json.loads(last)
    return found["status"], {name.partition(".")[0] for name in found["modules"]}


@pytest.mark.parametrize("args", [("--help",), ("check-config",), ("handlers",), ("handlers", "--json")])
def test_the_quick_commands_import_no_heavy_library(args: tuple[str, ...]) -> None:
    status, modules = imported_by(*args)
    assert status == 0
    assert sorted(modules & set(HEAVY)) == []


def test_help_does_not_even_load_the_settings() -> None:
    status, modules = imported_by("--help")
    assert status == 0
    assert {"pydantic", "pydantic_settings", "yaml", "asyncio"} & modules == set()


def test_pydantic_settings_is_imported_only_when_a_variable_overrides_a_key() -> None:
    """Without RC_WORKER_* variables (RC_WORKER_CONFIG aside) the file is validated by pydantic alone."""
    status, modules = imported_by("check-config")
    assert status == 0
    assert "pydantic_settings" not in modules
    status, modules = imported_by("check-config", RC_WORKER_KAFKA__TOPIC="from-variable")
    assert status == 0
    assert "pydantic_settings" in modules


def test_the_inspection_sees_what_a_command_imports(tmp_path: Path) -> None:
    """Not blind: a command that works on the database imports SQLAlchemy, and logs through structlog."""
    status, modules = imported_by("db", "upgrade", RC_WORKER_PERSISTENCE__URL=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}")
    assert status == 0
    assert {"sqlalchemy", "structlog", "asyncio"} <= modules


def test_a_command_run_without_the_loop_that_awaits_fails_loudly() -> None:
    """A command marked loop=False that comes to await something is a bug, never a command half run in silence."""

    async def finishes() -> int:
        return 3

    async def awaits() -> int:
        await asyncio.sleep(0)
        return 0

    assert _run(finishes(), loop=False) == 3
    with pytest.raises(RuntimeError, match="needs the event loop"):
        _run(awaits(), loop=False)


def test_structlog_imported_after_configure_logs_as_configured() -> None:
    """logs.configure leaves structlog unimported; whoever imports it later gets the configured chain (JSON, redacted)."""
    script = (
        "import sys\n"
        "from worker import logs\n"
        "from worker.config import LoggingSettings\n"
        "logs.configure(LoggingSettings(format='json', level='warning'), secrets=['hunter2'])\n"
        "assert 'structlog' not in sys.modules\n"
        "import structlog\n"
        "structlog.get_logger('t').info('not_shown')\n"
        "structlog.get_logger('t').warning('late_import', password='hunter2')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    [line] = result.stderr.splitlines()
    found = json.loads(line)
    assert (found["event"], found["level"], found["password"]) == ("late_import", "warning", "***")
