"""`rc-worker ingest` and `rc-worker apply` refuse to start without their credentials."""

from __future__ import annotations

import pytest

from tests.support import rc_worker
from tests.test_cli import local_env


@pytest.mark.parametrize(
    ("command", "names"),
    [("ingest", "ingest.secret and ingest.webhook_token"), ("apply", "rocketchat.user_id and rocketchat.auth_token")],
)
def test_missing_credentials_exit_2_naming_the_keys(command: str, names: str, sqlite_url: str) -> None:
    """Without a secret (ingest) or an account (apply) the command is a configuration error: exit 2, the keys named."""
    result = rc_worker(command, env=local_env(sqlite_url), check=False, timeout=60)
    assert result.returncode == 2
    assert names in result.stderr


def test_secrets_given_in_the_environment_never_reach_the_output(sqlite_url: str) -> None:
    """check-config shows the bridge's secrets redacted."""
    secrets = {"RC_WORKER_INGEST__SECRET": "s3cr3t-ingest", "RC_WORKER_ROCKETCHAT__AUTH_TOKEN": "s3cr3t-token"}
    env = local_env(sqlite_url, **secrets)
    result = rc_worker("check-config", env=env, check=False, timeout=60)
    assert "s3cr3t" not in result.stdout + result.stderr
    assert "secret: '***'" in result.stdout
