"""`rc-worker` as an operator runs it: load, topics create, db upgrade, state, and bad configuration.

Each command runs as a subprocess, so exit statuses and output are what a shell sees.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import FIXTURES, ROOT, TopicSet, rc_worker, store_for
from worker.apps.persistence import PersistenceWriter
from worker.cli import main
from worker.errors import ConfigError
from worker.kafka import admin, read_topic
from worker.persistence.associations import Association, AssociationModel
from worker.persistence.unit import UnitOfWork
from worker.tools.dump import read_records_file


def local_env(database_url: str, **extra: str) -> dict[str, str]:
    """An environment for commands that need no broker: the repository's config and ``database_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RC_WORKER_")}
    env.update(RC_WORKER_CONFIG=str(ROOT / "config.yaml"), RC_WORKER_PERSISTENCE__URL=database_url)
    env.update(RC_WORKER_OBSERVABILITY__PORT="0")  # other workers on this host may hold the default port
    env.update(extra)
    return env


async def partition_count(topics: TopicSet, name: str) -> int:
    """How many partitions topic ``name`` has (0 if it does not exist)."""
    async with admin(topics.kafka_settings()) as client:
        described = await client.describe_topics([name])
    return sum(len(found["partitions"]) for found in described if found["error_code"] == 0)


VALID_LINE = (FIXTURES / "valid.jsonl").read_text().splitlines()[0]


class TestLoadFile:
    """`rc-worker load` reads the whole contract file before it sends anything."""

    @pytest.mark.parametrize(
        ("line", "reason"),
        [
            ("{not json", "not JSON"),
            ("[1, 2]", "must be a JSON object"),
            ('{"key": 7, "headers": {}, "value": "{}"}', "key must be a string"),
            ('{"key": "r", "headers": {"a": 1}, "value": "{}"}', "headers must be an object of strings"),
            ('{"key": "r", "headers": {}}', "exactly one of value and value_b64"),
            ('{"key": "r", "headers": {}, "value": "{}", "value_b64": "e30="}', "exactly one of value and value_b64"),
            ('{"key": "r", "headers": {}, "value": {"a": 1}}', "value must be a string"),
            ('{"key": "r", "headers": {}, "value_b64": "not base64!"}', "base64"),
        ],
    )
    def test_malformed_line_is_refused_with_its_number_and_reason(self, tmp_path: Path, line: str, reason: str) -> None:
        """A malformed line names the file, its line number and what is wrong."""
        path = tmp_path / "records.jsonl"
        path.write_text(f"{VALID_LINE}\n\n{line}\n{VALID_LINE}\n")
        with pytest.raises(ConfigError) as refused:
            read_records_file(path)
        assert f"{path}:3: " in str(refused.value)
        assert reason.lower() in str(refused.value).lower()

    def test_blank_lines_and_extra_keys_are_ignored(self, tmp_path: Path) -> None:
        """Blank lines are skipped and keys such as `why` do not reach the record."""
        path = tmp_path / "records.jsonl"
        why = json.dumps({**json.loads(VALID_LINE), "why": "a note"})
        path.write_text(f"\n{VALID_LINE}\n\n{why}\n")
        records = read_records_file(path)
        assert len(records) == 2
        assert records[0] == records[1]

    @pytest.mark.kafka
    async def test_malformed_line_stops_the_command_before_anything_is_sent(
        self, topics: TopicSet, tmp_path: Path, sqlite_url: str
    ) -> None:
        """Exit status 2, the line and reason on stderr, and the topic stays empty."""
        path = tmp_path / "records.jsonl"
        path.write_text(f"{VALID_LINE}\n{VALID_LINE}\n{{oops\n")
        result = rc_worker("load", str(path), env=topics.env(sqlite_url), check=False)
        assert result.returncode == 2
        assert f"{path}:3: not JSON" in result.stderr
        assert "nothing was sent" in result.stderr
        assert [r async for r in read_topic(topics.kafka_settings(), topics.topic, idle_timeout_ms=500)] == []

    @pytest.mark.kafka
    async def test_load_sends_every_record_in_order_and_prints_how_many(self, topics: TopicSet, tmp_path: Path, sqlite_url: str) -> None:
        """Every record arrives with its key, headers and value, each key's records in file order."""
        result = rc_worker("load", str(FIXTURES / "valid.jsonl"), env=topics.env(sqlite_url))
        assert result.stdout.strip() == f"loaded 40 records into {topics.topic}"

        sent = read_records_file(FIXTURES / "valid.jsonl")
        received = [r async for r in read_topic(topics.kafka_settings(), topics.topic)]
        received.sort(key=lambda r: (r.partition, r.offset))
        assert len(received) == len(sent)
        for key in {r.key for r in sent}:
            expected = [(r.value, r.headers) for r in sent if r.key == key]
            assert [(r.value, r.headers) for r in received if r.key == key] == expected

    @pytest.mark.kafka
    async def test_topic_option_overrides_the_configured_topic(self, topics: TopicSet, tmp_path: Path, sqlite_url: str) -> None:
        """--topic sends to the named topic instead of kafka.topic."""
        result = rc_worker("load", str(FIXTURES / "invalid.jsonl"), "--topic", topics.commands_topic, env=topics.env(sqlite_url))
        assert result.stdout.strip() == f"loaded 8 records into {topics.commands_topic}"
        assert len([r async for r in read_topic(topics.kafka_settings(), topics.commands_topic)]) == 8
        assert [r async for r in read_topic(topics.kafka_settings(), topics.topic, idle_timeout_ms=500)] == []


@pytest.mark.kafka
class TestTopicsCreate:
    """`rc-worker topics create` makes the three topics, and apply's dead-letter topic, once."""

    async def test_topics_create_is_idempotent(self, kafka_bootstrap: str, sqlite_url: str) -> None:
        """The first run creates the topics with the partitions asked for; the second changes nothing."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        fresh = TopicSet(kafka_bootstrap, name, f"{name}.dlq", f"{name}.cmd", f"g-{name}")
        env = fresh.env(sqlite_url)

        first = rc_worker("topics", "create", "--partitions", "3", env=env)
        expected = [name, f"{name}.dlq", f"{name}.cmd", f"{name}.cmd.dlq"]
        assert sorted(first.stdout.split()) == sorted(["created"] * 4 + expected)
        second = rc_worker("topics", "create", "--partitions", "5", env=env)
        assert second.stdout.strip() == "all topics exist"
        assert await partition_count(fresh, name) == 3

    def test_partitions_below_one_exit_2(self, sqlite_url: str) -> None:
        """--partitions 0 is refused as bad usage."""
        result = rc_worker("topics", "create", "--partitions", "0", env=local_env(sqlite_url), check=False)
        assert result.returncode == 2
        assert "--partitions must be at least 1" in result.stderr


class TestDbUpgrade:
    """`rc-worker db upgrade` creates the schema, and is safe to run again."""

    def test_db_upgrade_is_idempotent(self, sqlite_url: str) -> None:
        """The second run reports the schema already current."""
        env = local_env(sqlite_url)
        first = rc_worker("db", "upgrade", env=env)
        assert "(was None)" in first.stdout
        second = rc_worker("db", "upgrade", env=env)
        assert "(already current)" in second.stdout
        assert first.stdout.split()[3] == second.stdout.split()[3]  # "schema at revision <rev> ..."

    def test_run_refuses_a_database_without_the_schema(self, sqlite_url: str) -> None:
        """`run` on a database never upgraded exits 1 and says to run `db upgrade`."""
        result = rc_worker("run", env=local_env(sqlite_url), check=False, timeout=60)
        assert result.returncode == 1
        assert "rc-worker db upgrade" in result.stderr


ROOM = Association(AssociationModel.ROOM, "r1")
USER = Association(AssociationModel.USER, "u1")
TOTAL = Association(AssociationModel.MISC, "total")


@pytest.fixture
async def state_url(sqlite_url: str) -> str:
    """A database holding three records of app `demo` and one of app `other`."""
    async with store_for(sqlite_url) as store:
        unit = UnitOfWork(store)
        demo = PersistenceWriter(unit, "demo")
        await demo.create_with_associations({"text": "hello"}, [ROOM, USER])
        await demo.create_with_association({"text": "bye"}, ROOM)
        await demo.update_by_association(TOTAL, {"count": 2}, upsert=True)
        await PersistenceWriter(unit, "other").create_with_association({"secret": True}, ROOM)
        await store.commit(unit)
    return sqlite_url


class TestState:
    """`rc-worker state` shows one app's records, never another app's."""

    def test_state_get_prints_the_data_of_matching_records_as_a_json_list(self, state_url: str) -> None:
        """Only this app's records with the association, their data only."""
        result = rc_worker("state", "get", "--app", "demo", "--association", "room:r1", env=local_env(state_url))
        assert sorted(json.loads(result.stdout), key=str) == [{"text": "bye"}, {"text": "hello"}]

    def test_state_get_with_no_match_prints_an_empty_list(self, state_url: str) -> None:
        """No records is `[]`, not an error."""
        result = rc_worker("state", "get", "--app", "demo", "--association", "room:elsewhere", env=local_env(state_url))
        assert json.loads(result.stdout) == []

    def test_state_dump_prints_one_record_a_line(self, state_url: str) -> None:
        """Each line is {"id", "version", "associations", "data"} with associations as MODEL:ID strings."""
        result = rc_worker("state", "dump", "--app", "demo", env=local_env(state_url))
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert all(set(line) == {"id", "version", "associations", "data"} for line in lines)
        assert all(isinstance(line["id"], str) and isinstance(line["version"], int) for line in lines)
        assert sorted((sorted(line["associations"]), line["data"]) for line in lines) == sorted(
            [
                (["room:r1", "user:u1"], {"text": "hello"}),
                (["room:r1"], {"text": "bye"}),
                (["misc:total"], {"count": 2}),
            ]
        )

    def test_state_get_with_a_malformed_association_exits_2(self, state_url: str) -> None:
        """An association that is not MODEL:ID is bad usage, and the message shows the form."""
        result = rc_worker("state", "get", "--app", "demo", "--association", "nope", env=local_env(state_url), check=False)
        assert result.returncode == 2, result.stderr
        assert "--association: association 'nope' must be MODEL:ID" in result.stderr


class TestBadConfiguration:
    """A bad setting stops any command with exit status 2, naming the key and its variable."""

    # In-process: these fail while loading the settings, before anything global is configured.
    @pytest.fixture
    def cli(self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sqlite_url: str) -> Callable[..., tuple[int, str]]:
        """Run `rc-worker ARGS` in this process with extra variables; returns (status, stderr)."""
        for name in [k for k in os.environ if k.startswith("RC_WORKER_")]:
            monkeypatch.delenv(name)

        def run(*args: str, **variables: str) -> tuple[int, str]:
            for name, value in local_env(sqlite_url, **variables).items():
                monkeypatch.setenv(name, value)
            status = main(list(args))
            return status, capsys.readouterr().err

        return run

    @pytest.mark.parametrize(
        ("variable", "value", "expected"),
        [
            ("RC_WORKER_KAFKA__TOPICZ", "x", ["kafka.topicz", "RC_WORKER_KAFKA__TOPICZ", "unknown key"]),
            ("RC_WORKER_KAFKA__MAX_BATCH_RECORDS", "lots", ["kafka.max_batch_records", "RC_WORKER_KAFKA__MAX_BATCH_RECORDS", "integer"]),
            ("RC_WORKER_KAFKA__MAX_BATCH_RECORDS", "0", ["kafka.max_batch_records", "greater than or equal to 1"]),
            ("RC_WORKER_PERSISTENCE__URL", "sqlite:///x.db", ["persistence.url", "RC_WORKER_PERSISTENCE__URL", "sqlite+aiosqlite://"]),
            ("RC_WORKER_LOGGING__LEVEL", "loud", ["logging.level", "RC_WORKER_LOGGING__LEVEL", "'debug'"]),
            ("RC_WORKER_HANDLERS__ENABLED", "message-count", ["handlers", "JSON"]),
        ],
    )
    def test_bad_variable_exits_2_naming_key_and_variable(
        self, cli: Callable[..., tuple[int, str]], variable: str, value: str, expected: list[str]
    ) -> None:
        """The message names the key, its environment variable and what is allowed."""
        status, stderr = cli("db", "upgrade", **{variable: value})
        assert status == 2, stderr
        for fragment in expected:
            assert fragment in stderr

    def test_unknown_key_in_the_config_file_exits_2_naming_file_and_key(self, cli: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
        """A misspelt key in config.yaml is named with the file it is in."""
        config = tmp_path / "config.yaml"
        config.write_text("kafka:\n  topic: events\n  bootstrap_server: localhost:9092\n")
        status, stderr = cli("--config", str(config), "db", "upgrade")
        assert status == 2
        assert f"in {config}" in stderr
        assert "kafka.bootstrap_server (env RC_WORKER_KAFKA__BOOTSTRAP_SERVER): unknown key" in stderr

    def test_missing_config_file_exits_2_naming_it(self, cli: Callable[..., tuple[int, str]], tmp_path: Path) -> None:
        """A config file that cannot be read is named, with the option to pass another."""
        status, stderr = cli("--config", str(tmp_path / "absent.yaml"), "db", "upgrade")
        assert status == 2
        assert f"cannot read config file {tmp_path / 'absent.yaml'}" in stderr

    def test_unknown_app_in_enabled_handlers_exits_2_naming_app_and_fix(self, sqlite_url: str) -> None:
        """An app that is not installed is named, with the installed ones and how to fix it."""
        env = local_env(sqlite_url, RC_WORKER_HANDLERS__ENABLED='["message-count", "no-such-app"]')
        result = rc_worker("run", env=env, check=False, timeout=60)
        assert result.returncode == 2
        assert "'no-such-app', which is not installed" in result.stderr
        assert "message-count" in result.stderr.split("installed:")[1]
        assert "pip install" in result.stderr
        assert "remove it from handlers.enabled" in result.stderr
