"""The pytest plugin users get with the package: rc_kafka, rc_topic_from_file, rc_replay."""

from __future__ import annotations

import pytest

from tests.support import FIXTURES

pytest_plugins = ["pytester"]

# A user's own settings; pytest-asyncio, installed here, wants its loop scope named.
INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

USERS_TESTS = f"""
import asyncio
from pathlib import Path

import pytest

VALID = Path({str(FIXTURES / "valid.jsonl")!r})


def test_a_file_replayed_through_a_handler(rc_topic_from_file, rc_replay):
    topic = rc_topic_from_file(VALID, partitions=3)
    result = rc_replay(topic, handlers=["message-count"])
    assert (result.summary.records, result.summary.per_app) == (40, {{"message-count": 40}})
    assert result.data("message-count", "misc:message-count") == [{{"count": 40}}]
    assert result.database_url.startswith("sqlite+aiosqlite:///")


def test_each_call_gets_a_fresh_topic(rc_topic_from_file):
    assert rc_topic_from_file(VALID) != rc_topic_from_file(VALID)


def test_the_factories_work_inside_a_running_loop(rc_topic_from_file, rc_replay):
    async def inside():
        return rc_replay(rc_topic_from_file(VALID, partitions=1)).summary.events

    assert asyncio.run(inside()) == 40
"""


@pytest.mark.kafka
class TestPlugin:
    def test_a_users_suite_gets_the_fixtures_from_the_entry_point(self, pytester: pytest.Pytester, kafka_bootstrap: str) -> None:
        """A test file that only names the fixtures runs against the broker, with no conftest of ours."""
        pytester.makepyfile(test_users=USERS_TESTS)
        pytester.makeini(INI)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=240)
        result.assert_outcomes(passed=3)

    def test_without_a_broker_the_fixtures_skip_outside_ci(self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
        """No KAFKA_BOOTSTRAP_SERVERS, nothing on the local port, no start script: the test skips, saying why."""
        monkeypatch.delenv("CI", raising=False)
        monkeypatch.setattr("worker.pytest_plugin.LOCAL_BROKER", ("127.0.0.1", 1))
        monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS", raising=False)
        pytester.makepyfile(test_users="def test_needs_kafka(rc_kafka):\n    pass\n")
        pytester.makeini(INI)
        result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
        result.assert_outcomes(skipped=1)
        result.stdout.fnmatch_lines(["*no Kafka broker for rc_kafka*"])
