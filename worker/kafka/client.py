"""The one place aiokafka is configured: client options (TLS, SASL), error translation, and helpers every client role shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import structlog
from aiokafka.errors import (
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.config import KafkaSettings
from worker.errors import BrokerError, ConfigError
from worker.events import RawRecord

log = structlog.get_logger("worker.kafka")
# The kafka settings named as aiokafka names its options, passed to every client as they are.
_AIOKAFKA_NAMED = {"bootstrap_servers", "client_id", "request_timeout_ms"}


def client_options(settings: KafkaSettings) -> dict[str, Any]:
    """Connection and security options shared by every client.

    Raises:
        ConfigError: SASL without a username or password, or a TLS file that cannot be loaded.

    """
    security = settings.security
    options: dict[str, Any] = {**settings.model_dump(include=_AIOKAFKA_NAMED), "security_protocol": security.protocol}
    if security.protocol.startswith("SASL"):
        if not security.sasl_username or security.sasl_password is None:
            raise ConfigError(
                f"kafka.security.protocol is {security.protocol}, which needs kafka.security.sasl_username and "
                "kafka.security.sasl_password (env RC_WORKER_KAFKA__SECURITY__SASL_USERNAME / __SASL_PASSWORD)"
            )
        # aiokafka takes the same two options for PLAIN and for SCRAM-SHA-256/512.
        options["sasl_mechanism"] = security.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password.get_secret_value()
    if security.protocol.endswith("SSL"):
        options["ssl_context"] = _ssl_context(settings)
    return options


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    security = settings.security
    key = "kafka.security.ssl_cafile"
    try:
        # No cafile: the system's trusted CAs, as for any TLS client; hostnames are checked.
        context = ssl.create_default_context(cafile=security.ssl_cafile)
        if security.ssl_certfile:
            key = "kafka.security.ssl_certfile"
            context.load_cert_chain(security.ssl_certfile, security.ssl_keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load the TLS certificate or key: {exc}; check the path and that it is PEM") from exc
    return context


class _ConnectFailures(logging.Handler):
    """Remembers the last authentication or TLS failure aiokafka logged.

    aiokafka logs why it could not connect to a broker, then raises a bare "Unable to
    bootstrap"; with this, a failed start-up can say "authentication failed" instead.
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0
        self.last: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, SaslAuthenticationFailed | UnsupportedSaslMechanismError | ssl.SSLError):
                self.count += 1
                self.last = arg


_connect_failures = _ConnectFailures()


def _watch_connect_failures() -> _ConnectFailures:
    # Installed on first use, not at import: importing the package must not change logging.
    aiokafka_log = logging.getLogger("aiokafka")
    if _connect_failures not in aiokafka_log.handlers:
        aiokafka_log.addHandler(_connect_failures)
    return _connect_failures


def _explain(failure: BaseException) -> str:
    if isinstance(failure, ssl.SSLError):
        return f"TLS handshake failed ({failure}); check kafka.security.ssl_cafile, ssl_certfile and ssl_keyfile"
    return (
        f"authentication failed ({failure}); check kafka.security.sasl_mechanism, sasl_username and "
        "sasl_password (env RC_WORKER_KAFKA__SECURITY__SASL_PASSWORD)"
    )


@contextlib.contextmanager
def translate(action: str) -> Iterator[None]:
    """Turn aiokafka's errors into BrokerError, chained; an authentication or TLS failure is named."""
    failures = _watch_connect_failures().count
    try:
        yield
    except KafkaError as exc:
        failure = _connect_failures.last if _connect_failures.count != failures else None
        if failure is not None:
            raise BrokerError(f"{action} failed: {_explain(failure)}") from exc
        raise BrokerError(f"{action} failed: {type(exc).__name__}: {exc}") from exc


def raw_record(record: Any) -> RawRecord:
    """Aiokafka's ConsumerRecord as the worker's own RawRecord."""
    # Kafka allows a header without a value (null); to us it is an empty one.
    headers = tuple((name, value if value is not None else b"") for name, value in record.headers or ())
    return RawRecord(record.topic, record.partition, record.offset, record.timestamp, record.key, record.value, headers)


def raw_batches(batches: Mapping[Any, Sequence[Any]]) -> dict[int, list[RawRecord]]:
    """Aiokafka's getmany result as the worker's records by partition, partitions without records left out."""
    return {tp.partition: [raw_record(r) for r in records] for tp, records in batches.items() if records}


def record_bytes(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """At most how many bytes a record takes in a batch of its own: what both size limits count."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers)))


async def start_bounded(client: Any, bootstrap: str, timeout_s: float | None) -> None:
    """Start ``client`` within ``timeout_s`` (None: aiokafka's own limits), closing it if it fails half-way.

    A half-started client keeps sockets and tasks; an operator's command must not hang on a dead broker.
    """
    try:
        with translate(f"connecting to Kafka at {bootstrap}"):
            async with asyncio.timeout(timeout_s):
                await client.start()
    except TimeoutError:
        await close_quietly(client)
        raise BrokerError(f"connecting to Kafka at {bootstrap} failed: no answer within {timeout_s:g}s; is the broker running?") from None
    except BaseException:
        await close_quietly(client)
        raise


async def close_quietly(client: Any) -> None:
    """Stop a client, half-started or not, ignoring what a dead connection raises."""
    stop = getattr(client, "stop", None) or client.close
    with contextlib.suppress(KafkaError, OSError):
        await stop()


# aiokafka (0.14.0, its source read) offers no public call for either of these, so this is the one
# place that reaches into its private attributes; check both when aiokafka is upgraded:
# - whether a consumer knows its group coordinator and holds a generation: only its group
#   coordinator (``_coordinator``) knows; before it joins a group it has none.
# - closing the network client after ``stop()`` was interrupted: ``stop()`` marks the consumer
#   closed before it awaits anything, so calling it again does nothing, and its ``_client``
#   stays open.
def group_state(consumer: Any) -> tuple[bool, int] | None:
    """(whether the group coordinator is known, this member's generation); None before joining a group."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None:
        return None
    return coordinator.coordinator_id is not None, int(coordinator.generation)


async def close_client(consumer: Any) -> None:
    """Close a consumer's network client after a ``stop()`` that was cancelled half-way."""
    await consumer._client.close()
