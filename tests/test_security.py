"""Security: Kafka SASL and TLS through the config, secrets kept out of every output, hostile input bounded.

SASL runs against the session's own broker (tests/services.py), which has a SASL_PLAINTEXT
listener accepting PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for one user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import subprocess
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from tests.services import SASL_PASSWORD, SASL_USER, OwnKafka, OwnPostgres
from tests.support import ROOT, TopicSet, WorkerProcess, counts, rc_worker, store_for, wait_until
from tests.test_failures import (
    STRUCTURED,
    check_letter,
    counted,
    dead_letters,
    event_value,
    message_count,
    originals,
    own_topics,
    produce,
    room_counts,
    running,
    settings_for,
    valid_events,
)
from worker import constants
from worker.config import KafkaSecurity, KafkaSettings, Settings
from worker.errors import ConfigError, DecodeError
from worker.events import RawRecord, decode
from worker.kafka import client_options
from worker.logs import LibraryFilter, Redactor, secrets_of

VALID = json.loads((ROOT / "tests" / "fixtures" / "valid.jsonl").read_text().splitlines()[0])["value"]


def record(value: bytes | None, headers: tuple[tuple[str, bytes], ...] = ()) -> RawRecord:
    """A record on partition 0 at offset 0."""
    return RawRecord("t", 0, 0, 0, b"k", value, headers)


def nested(depth: int, kind: str = "array") -> Any:
    """A JSON value ``depth`` levels deep."""
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "array" else {"a": value}
    return value


def with_custom_fields(fields: Any) -> bytes:
    """The first valid sample with ``customFields`` = {"deep": fields}: ``fields`` starts at level 4."""
    event = json.loads(VALID)
    event["data"]["customFields"] = {"deep": fields}
    return json.dumps(event).encode()


def refusal(value: bytes | None, headers: tuple[tuple[str, bytes], ...] = ()) -> str:
    """The reason decode gives for refusing the record."""
    with pytest.raises(DecodeError) as refused:
        decode(record(value, headers))
    return refused.value.reason


# -- hostile input --------------------------------------------------------------------------------


class TestInputBounds:
    """Oversized values, deep nesting and header floods are refused with a reason, in bounded memory."""

    def test_value_over_the_size_limit_is_refused_with_its_size(self) -> None:
        """A value one byte over MAX_VALUE_BYTES is refused, naming its size and the limit."""
        reason = refusal(b" " * (constants.MAX_VALUE_BYTES + 1))
        assert reason == f"value is {constants.MAX_VALUE_BYTES + 1} bytes, over the limit of {constants.MAX_VALUE_BYTES}"

    @pytest.mark.parametrize("kind", ["array", "object"])
    def test_json_nested_deeper_than_the_limit_is_refused(self, kind: str) -> None:
        """One level past MAX_JSON_DEPTH is refused; exactly at it the event is accepted."""
        # The envelope, data and customFields' object make 3 levels.
        at_limit = with_custom_fields(nested(constants.MAX_JSON_DEPTH - 3, kind))
        assert decode(record(at_limit)).is_post_message_sent
        reason = refusal(with_custom_fields(nested(constants.MAX_JSON_DEPTH - 2, kind)))
        assert reason == f"value nests JSON more than {constants.MAX_JSON_DEPTH} levels deep"

    def test_deep_nesting_in_binary_mode_is_refused(self) -> None:
        """The limit holds for the value of a binary-mode record too."""
        headers = (("ce_specversion", b"1.0"), ("ce_type", constants.POST_MESSAGE_SENT.encode()), ("ce_source", b"//s"), ("ce_id", b"1"))
        assert "levels deep" in refusal(json.dumps(nested(500)).encode(), headers)

    def test_brackets_inside_strings_do_not_count_as_nesting(self) -> None:
        """Text full of brackets, quotes and escapes is a string, not depth."""
        text = '[{"\\"' * 500 + "]}" * 500
        event = json.loads(VALID)
        event["data"]["text"] = text
        decoded = decode(record(json.dumps(event).encode()))
        assert decoded.message is not None
        assert decoded.message.text == text

    def test_too_many_headers_are_refused(self) -> None:
        """More than MAX_HEADERS headers are refused, naming the count."""
        headers = tuple((f"h{n}", b"v") for n in range(constants.MAX_HEADERS + 1))
        assert (
            refusal(VALID.encode(), headers) == f"record has {constants.MAX_HEADERS + 1} headers, over the limit of {constants.MAX_HEADERS}"
        )

    def test_headers_over_the_byte_limit_are_refused(self) -> None:
        """Headers larger than MAX_HEADER_BYTES together are refused, naming their size."""
        headers = (("big", b"x" * constants.MAX_HEADER_BYTES),)
        size = 3 + constants.MAX_HEADER_BYTES
        assert refusal(VALID.encode(), headers) == f"headers are {size} bytes, over the limit of {constants.MAX_HEADER_BYTES}"

    @pytest.mark.parametrize(
        "value",
        [
            pytest.param(b"[" * constants.MAX_VALUE_BYTES, id="deepest-possible"),
            pytest.param(b"[]" * (constants.MAX_VALUE_BYTES // 2), id="most-brackets"),
            pytest.param(b'["' + b'\\"' * (constants.MAX_VALUE_BYTES // 2 - 2) + b'"]', id="longest-escaped-string"),
        ],
    )
    def test_refusing_a_hostile_value_stays_within_bounded_memory(self, value: bytes) -> None:
        """Decoding a value at the size limit allocates a small multiple of the value, whatever its shape."""
        tracemalloc.start()
        try:
            with contextlib.suppress(DecodeError):
                decode(record(value))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # orjson reserves about 12 bytes per input byte for any document it parses, valid or not.
        assert peak < 16 * len(value)


# -- Kafka security settings ----------------------------------------------------------------------


def _security(**given: Any) -> KafkaSettings:
    return KafkaSettings(security=KafkaSecurity(**given))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed CA certificate and a client certificate and key (openssl)."""
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "client.key", directory / "client.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=rc-test",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return {"key": key, "cert": cert}


class TestClientOptions:
    """kafka.security reaches every Kafka client: SASL mechanisms and credentials, TLS files."""

    @pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    def test_sasl_settings_pass_through(self, mechanism: str) -> None:
        """Protocol, mechanism, username and password go to the client as given."""
        options = client_options(
            _security(protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism, sasl_username="alice", sasl_password="alice-secret")  # noqa: S106
        )
        assert options["security_protocol"] == "SASL_PLAINTEXT"
        assert (options["sasl_mechanism"], options["sasl_plain_username"], options["sasl_plain_password"]) == (
            mechanism,
            "alice",
            "alice-secret",
        )

    def test_sasl_without_credentials_is_a_config_error_naming_the_keys(self) -> None:
        """SASL with no username or password stops start-up naming both keys."""
        with pytest.raises(ConfigError, match=r"kafka\.security\.sasl_username and kafka\.security\.sasl_password"):
            client_options(_security(protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="alice"))

    def test_tls_files_build_a_verifying_context(self, tls_files: dict[str, Path]) -> None:
        """SSL with a CA file and a client certificate: a context that checks the broker's certificate and name."""
        options = client_options(
            _security(
                protocol="SASL_SSL",
                sasl_username="alice",
                sasl_password="alice-secret",  # noqa: S106
                ssl_cafile=str(tls_files["cert"]),
                ssl_certfile=str(tls_files["cert"]),
                ssl_keyfile=str(tls_files["key"]),
            )
        )
        context = options["ssl_context"]
        assert isinstance(context, ssl.SSLContext)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert any(ca["subject"] == ((("commonName", "rc-test"),),) for ca in context.get_ca_certs())

    @pytest.mark.parametrize("key", ["ssl_cafile", "ssl_certfile"])
    def test_unreadable_tls_file_is_a_config_error_naming_the_key(self, key: str, tmp_path: Path, tls_files: dict[str, Path]) -> None:
        """A TLS file that is missing or not PEM stops start-up naming its key."""
        given = {"ssl_cafile": str(tls_files["cert"]), key: str(tmp_path / "missing.pem")}
        with pytest.raises(ConfigError, match=rf"kafka\.security\.{key}"):
            client_options(_security(protocol="SSL", **given))


# -- secrets --------------------------------------------------------------------------------------


class TestRedaction:
    """Configured secrets and URL passwords never reach a log line."""

    def test_secrets_of_the_configuration_are_all_found(self) -> None:
        """The SASL password, the database password (decoded) and app settings named like secrets."""
        settings = Settings(
            kafka=_security(protocol="SASL_PLAINTEXT", sasl_username="u", sasl_password="kafka-pw"),  # noqa: S106
            persistence={"url": "postgresql+asyncpg://rc:db%40pw@127.0.0.1/rc"},  # type: ignore[arg-type]
            handlers={"enabled": (), "settings": {"some-app": {"api_key": "app-key", "nested": {"token": "tok-1"}, "room": "r1"}}},  # type: ignore[arg-type]
        )
        assert sorted(secrets_of(settings)) == sorted(["kafka-pw", "db@pw", "app-key", "tok-1"])

    def test_log_values_are_redacted_everywhere(self) -> None:
        """Secrets in strings, nested values and exceptions, and any URL's password, become ***."""
        redactor = Redactor()
        redactor.use(["kafka-pw", "db@pw"])
        line = redactor(
            None,
            "info",
            {
                "event": "x",
                "reason": "login with kafka-pw failed",
                "url": "postgresql+asyncpg://rc:other-pw@host/db",
                "nested": {"list": ["db@pw", 3]},
                "error": ValueError("bad db@pw"),
            },
        )
        assert line == {
            "event": "x",
            "reason": "login with *** failed",
            "url": "postgresql+asyncpg://rc:***@host/db",
            "nested": {"list": ["***", 3]},
            "error": "ValueError: bad ***",
        }

    def test_library_lines_are_redacted_and_repeats_rate_limited(self) -> None:
        """A library's line loses its secrets; aiokafka's repeats of one message pass once per interval."""
        from worker.logs import redactor

        redactor.use(["lib-secret"])
        library_filter = LibraryFilter(interval_s=3600)

        def line(name: str, msg: str, *args: Any) -> logging.LogRecord:
            return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)

        first = line("sqlalchemy.engine", "connect to %s", "postgresql://u:lib-secret@h/db")
        assert library_filter.filter(first)
        assert first.getMessage() == "connect to postgresql://u:***@h/db"
        passed = [library_filter.filter(line("aiokafka", "Unable connect to node %s", n)) for n in range(5)]
        assert passed == [True, False, False, False, False]
        redactor.use([])


# -- against the broker's SASL listener -----------------------------------------------------------


def sasl_env(topics: TopicSet, url: str, broker: OwnKafka, mechanism: str, password: str, **extra: str) -> dict[str, str]:
    """A worker environment that reaches ``topics`` through the SASL listener."""
    return topics.env(
        url,
        RC_WORKER_KAFKA__BOOTSTRAP_SERVERS=broker.sasl_bootstrap,
        RC_WORKER_KAFKA__SECURITY__PROTOCOL="SASL_PLAINTEXT",
        RC_WORKER_KAFKA__SECURITY__SASL_MECHANISM=mechanism,
        RC_WORKER_KAFKA__SECURITY__SASL_USERNAME=SASL_USER,
        RC_WORKER_KAFKA__SECURITY__SASL_PASSWORD=password,
        **extra,
    )


@pytest.mark.kafka
class TestSasl:
    """The worker authenticates with SASL; wrong credentials stop it at start-up, saying so."""

    @pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    async def test_right_credentials_work(self, own_kafka: OwnKafka, sqlite_url: str, mechanism: str) -> None:
        """A worker on the SASL listener processes events and dead-letters, with each mechanism."""
        topics = await own_topics(own_kafka)
        records = [*valid_events(30, rooms=3, prefix=f"sasl-{mechanism}"), (b"r000", b"{not json", STRUCTURED)]
        await produce(topics.bootstrap, topics.topic, records)
        security = KafkaSecurity(protocol="SASL_PLAINTEXT", sasl_mechanism=mechanism, sasl_username=SASL_USER, sasl_password=SASL_PASSWORD)  # type: ignore[arg-type]
        settings = settings_for(topics, sqlite_url, kafka={"bootstrap_servers": own_kafka.sasl_bootstrap, "security": security})

        async with running(settings, [message_count()]):
            await wait_until(counted(sqlite_url, room_counts(records)), timeout=60, what="every event counted")
            await dead_letters(topics, at_least=1)

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        assert [letter.value for letter in letters] == [b"{not json"]

    @pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
    async def test_wrong_password_stops_start_up_with_a_clear_message(self, own_kafka: OwnKafka, sqlite_url: str, mechanism: str) -> None:
        """`rc-worker run` with a wrong password exits 1 saying authentication failed, without echoing the password."""
        topics = await own_topics(own_kafka)
        async with store_for(sqlite_url):
            pass
        wrong = f"wrong-{uuid.uuid4().hex}"
        result = rc_worker("run", env=sasl_env(topics, sqlite_url, own_kafka, mechanism, wrong), timeout=90, check=False)

        assert result.returncode == 1
        message = next(line for line in result.stderr.splitlines() if line.startswith("rc-worker: "))
        assert message.startswith(f"rc-worker: error: connecting to Kafka at {own_kafka.sasl_bootstrap} failed: authentication failed")
        assert "sasl_password" in message
        assert wrong not in result.stderr + result.stdout


async def create_role_database(admin_url: str, password: str) -> str:
    """A database owned by a new role that logs in with ``password``; returns its URL."""
    admin = make_url(admin_url)
    name = f"rcsec_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(user=admin.username, password=admin.password, host=admin.host, port=admin.port, database=admin.database)
    try:
        await conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        await conn.execute(f"CREATE DATABASE {name} OWNER {name}")
    finally:
        await conn.close()
    return admin.set(username=name, password=password, database=name).render_as_string(hide_password=False)


@pytest.mark.kafka
@pytest.mark.postgres
class TestSecretsInOutput:
    """Passwords given to the worker never appear in its logs or in rc-worker's output."""

    async def test_passwords_never_appear_in_logs_or_command_output(
        self, own_kafka: OwnKafka, own_postgres: OwnPostgres, tmp_path: Path
    ) -> None:
        """A debug-level run, a failing run and check-config print neither the SASL nor the database password."""
        db_password = f"Db-Secr3t-{uuid.uuid4().hex[:8]}"
        url = await create_role_database(own_postgres.admin_url, db_password)
        async with store_for(url):
            pass
        topics = await own_topics(own_kafka)
        records = [*valid_events(20, rooms=2, prefix="secret"), (b"r001", b"[1, 2]", STRUCTURED)]
        await produce(topics.bootstrap, topics.topic, records)
        env = sasl_env(topics, url, own_kafka, "SCRAM-SHA-256", SASL_PASSWORD, RC_WORKER_LOGGING__LEVEL="debug")

        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            await wait_until(counted(url, room_counts(records)), timeout=90, what="every event counted")
        finally:
            status = worker.terminate()
        assert status == 0
        outputs = {"worker log": worker.log_path.read_text()}

        wrong_db = url.replace(db_password, "not-the-password")
        failed = rc_worker("run", env={**env, "RC_WORKER_PERSISTENCE__URL": wrong_db}, timeout=90, check=False)
        assert failed.returncode == 1
        assert "password authentication failed" in failed.stderr
        outputs["failed run"] = failed.stdout + failed.stderr
        checked = rc_worker("check-config", env=env, timeout=60, check=False)
        outputs["check-config"] = checked.stdout + checked.stderr

        for where, text in outputs.items():
            assert text.strip(), where
            for secret in (SASL_PASSWORD, db_password):
                assert secret not in text, f"{secret!r} appears in the {where}"


@pytest.mark.kafka
class TestHostileRecordsOnTheBroker:
    """Hostile records reach the dead-letter topic with their reason; the partition goes on."""

    async def test_oversized_deep_and_header_heavy_records_are_dead_lettered(self, topics: TopicSet, sqlite_url: str) -> None:
        """Too big, too deep, too many headers, too large headers: each dead-lettered once, value kept, reason given."""
        key = b"hostile"
        hostile = [
            (key, b" " * (constants.MAX_VALUE_BYTES + 1), STRUCTURED),
            (key, with_custom_fields(nested(200)), STRUCTURED),
            (key, VALID.encode(), tuple((f"h{n}", b"v") for n in range(constants.MAX_HEADERS + 50))),
            (key, VALID.encode(), (("huge", b"x" * (2 * constants.MAX_HEADER_BYTES)),)),
        ]
        after = [(key, event_value(f"after-hostile-{n}", "r9"), STRUCTURED) for n in range(5)]
        sent = await produce(topics.bootstrap, topics.topic, hostile + after)

        async with running(settings_for(topics, sqlite_url), [message_count()]):
            await dead_letters(topics, at_least=len(hostile), within=60)
            await wait_until(counted(sqlite_url, room_counts(after)), timeout=60, what="the events after them counted")

        letters = await dead_letters(topics)  # all of them, now that the worker has stopped
        stored = await originals(topics)
        assert len(letters) == len(hostile)
        reasons = []
        for letter in letters:
            where = (int(letter.header(constants.DLQ_PARTITION) or -1), int(letter.header(constants.DLQ_OFFSET) or -1))
            check_letter(letter, stored[where], topics.topic)
            reasons.append((letter.header(constants.DLQ_REASON) or b"").decode())
        assert sorted(where for where in ((s.partition, s.offset) for s in sent[: len(hostile)])) == sorted(
            (int(x.header(constants.DLQ_PARTITION) or -1), int(x.header(constants.DLQ_OFFSET) or -1)) for x in letters
        )
        assert [reason.split(",")[0] for reason in reasons] == [
            f"value is {constants.MAX_VALUE_BYTES + 1} bytes",
            f"value nests JSON more than {constants.MAX_JSON_DEPTH} levels deep",
            f"record has {constants.MAX_HEADERS + 50} headers",
            f"headers are {4 + 2 * constants.MAX_HEADER_BYTES} bytes",
        ]
        assert (await counts(sqlite_url)) == room_counts(after)
