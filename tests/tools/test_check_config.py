"""`rc-worker check-config`: the effective configuration with secrets redacted, every problem listed.

Most tests call the command's function in-process on settings loaded as the CLI loads them;
the two that need the CLI's own argument parsing and load errors run it as a subprocess (the
CLI configures logging for its process, which must not leak into other tests). Then the
README's reference table is checked against Settings.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, rc_worker
from worker.config import Settings, load_settings
from worker.tools.check_config import REDACTED, check_config_command, reference_rows, reference_table

CONFIG = ROOT / "config.yaml"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any RC_WORKER_* variable of the caller's; set more with setenv."""
    for name in [n for n in os.environ if n.startswith("RC_WORKER_")]:
        monkeypatch.delenv(name)
    return monkeypatch


async def check(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, str, str]:
    """``rc-worker check-config --config CONFIG`` in-process; returns (exit status, stdout, stderr)."""
    status = await check_config_command(load_settings(config), argparse.Namespace(config=config, reference=False))
    out, err = capsys.readouterr()
    return status, out, err


def cli(*args: str) -> tuple[int, str, str]:
    """``rc-worker ARGS`` as a subprocess, without the caller's RC_WORKER_* variables."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RC_WORKER_")}
    result = rc_worker(*args, env=clean, check=False)
    return result.returncode, result.stdout, result.stderr


def write_config(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class TestCheckConfig:
    async def test_a_valid_configuration_is_printed_whole_and_exits_zero(
        self, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
    ) -> None:
        """Every section of the effective configuration is printed as YAML; the status is 0."""
        status, out, err = await check(capsys, CONFIG)
        printed = yaml.safe_load(out)
        assert status == 0
        assert set(printed) == set(Settings.model_fields)
        assert printed["observability"]["port"] == Settings().observability.port
        assert "configuration is valid" in err

    async def test_the_environment_overrides_the_file_and_is_named(
        self, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
    ) -> None:
        """A variable's value is what is printed, and the header names the variables in effect."""
        env.setenv("RC_WORKER_KAFKA__TOPIC", "from-env")
        status, out, _ = await check(capsys, CONFIG)
        assert status == 0
        assert yaml.safe_load(out)["kafka"]["topic"] == "from-env"
        assert "RC_WORKER_KAFKA__TOPIC" in out.splitlines()[1]

    async def test_secrets_are_redacted_and_the_url_keeps_everything_else(
        self, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch
    ) -> None:
        """Passwords never reach the output; the database URL still shows user, host and database."""
        env.setenv("RC_WORKER_PERSISTENCE__URL", "postgresql+asyncpg://bob:hunter2@db.internal:5432/rc?password=hunter3")
        env.setenv("RC_WORKER_KAFKA__SECURITY__SASL_PASSWORD", "s3cret-sasl")
        status, out, _ = await check(capsys, CONFIG)
        printed = yaml.safe_load(out)
        assert status == 0
        assert "hunter" not in out
        assert "s3cret" not in out
        assert printed["persistence"]["url"] == "postgresql+asyncpg://bob:***@db.internal:5432/rc?password=***"
        assert printed["kafka"]["security"]["sasl_password"] == REDACTED

    async def test_every_problem_is_listed_and_the_status_is_two(
        self, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """Several problems of different kinds are all reported at once, one line each."""
        config = write_config(
            tmp_path,
            {
                "kafka": {"dead_letter_topic": "events", "topic": "events", "heartbeat_interval_ms": 20_000, "session_timeout_ms": 10_000},
                "handlers": {"enabled": ["message-count", "not-installed"], "settings": {"mentions": {"max_per_message": 0}}},
                "observability": {"liveness_stall_s": 10},
            },
        )
        status, _, err = await check(capsys, config)
        problems = [line for line in err.splitlines() if line.startswith("  - ")]
        assert status == 2
        assert "5 problem(s)" in err
        for expected in (
            "handlers.enabled lists 'not-installed'",
            "handlers.settings.mentions: app 'mentions' is installed but not in handlers.enabled",
            "kafka.heartbeat_interval_ms (20000) must be below kafka.session_timeout_ms",
            "must be three different topics",
            "observability.liveness_stall_s (10) must exceed processing.handler_timeout_s",
        ):
            assert sum(expected in line for line in problems) == 1, (expected, problems)

    async def test_invalid_app_settings_name_the_setting(
        self, capsys: pytest.CaptureFixture[str], env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """An enabled app's settings are validated by the app's own model."""
        config = write_config(tmp_path, {"handlers": {"enabled": ["mentions"], "settings": {"mentions": {"max_per_message": 0}}}})
        status, _, err = await check(capsys, config)
        assert status == 2
        assert "handlers.settings.mentions.max_per_message" in err

    def test_invalid_keys_are_all_listed_with_their_variables(self, tmp_path: Path) -> None:
        """Keys that do not load are each named, with the variable that sets them; status 2."""
        config = write_config(tmp_path, {"kafka": {"topic": "", "max_batch_records": 0}, "observability": {"port": 70000}})
        status, _, err = cli("check-config", "--config", str(config))
        assert status == 2
        for key in ("kafka.topic", "kafka.max_batch_records", "observability.port (env RC_WORKER_OBSERVABILITY__PORT)"):
            assert key in err

    def test_the_global_config_option_works_as_well(self, tmp_path: Path) -> None:
        """`rc-worker --config PATH check-config` reads the same file as `check-config --config PATH`."""
        config = write_config(tmp_path, {"kafka": {"topic": "global-option"}})
        status, out, _ = cli("--config", str(config), "check-config")
        assert status == 0
        assert yaml.safe_load(out)["kafka"]["topic"] == "global-option"


class TestReferenceTable:
    def test_every_key_has_a_row_with_its_variable_and_default(self) -> None:
        """The generated table covers every leaf key of Settings, with the variable pydantic-settings reads."""
        rows = {key: (env, default) for key, env, default in reference_rows()}
        assert rows["kafka.security.sasl_password"] == ("RC_WORKER_KAFKA__SECURITY__SASL_PASSWORD", "null")
        assert rows["handlers.enabled"] == ("RC_WORKER_HANDLERS__ENABLED", '["message-count"]')
        assert rows["observability.port"] == ("RC_WORKER_OBSERVABILITY__PORT", "9464")
        assert len(rows) == len(reference_table().splitlines()) - 2

    def test_the_readme_has_the_current_table(self) -> None:
        """README's Configuration section holds exactly the table `rc-worker check-config --reference` prints."""
        readme = (ROOT / "README.md").read_text()
        missing = [line for line in reference_table().splitlines() if line not in readme.splitlines()]
        assert not missing, "README.md is behind; paste `rc-worker check-config --reference` into it:\n" + "\n".join(missing)
