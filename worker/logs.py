"""The structlog processor chain: context variables first, secrets redacted, JSON lines unless on a terminal.

The runner binds topic, partition, offset and event id with ``bound_contextvars``, so every
line logged while an event is processed, by the worker or by a handler, carries them.
Passwords from the configuration (and any ``scheme://user:password@`` in a message) are
replaced by ``***`` in every line, the worker's and its libraries', and in ``rc-worker``'s
error messages.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog
from sqlalchemy.engine import make_url

from worker.config import LoggingSettings, Settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

REDACTED = "***"
# The password part of a URL's user info, in any message (DSNs in driver errors, URLs in reasons).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/?#@\s]*):[^@/\s]+@")
# App settings whose names say they are secret (handlers.settings.<app>.api_key, ...).
SECRET_NAME = re.compile(r"password|passwd|secret|token|api[_-]?key|credential|private[_-]?key", re.IGNORECASE)
# Shorter secrets would blank out ordinary words everywhere; the URL rule still covers them.
_MIN_SECRET_LENGTH = 3


class Redactor:
    """Replaces known secrets and URL passwords in text, and in every value of a log line."""

    def __init__(self) -> None:
        self._secrets: tuple[str, ...] = ()

    def use(self, secrets: Iterable[str]) -> None:
        """Redact these values from now on (longest first, so one never uncovers part of another)."""
        self._secrets = tuple(sorted({s for s in secrets if len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True))

    def text(self, value: str) -> str:
        """``value`` with every secret and URL password replaced by ``***``."""
        value = _URL_PASSWORD.sub(rf"\g<head>:{REDACTED}@", value)
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value

    def value(self, value: Any) -> Any:
        """A log value with its text redacted, looking into mappings and sequences."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        return value

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        """The structlog processor."""
        return {key: self.value(value) for key, value in event_dict.items()}


redactor = Redactor()


def redact(text: str) -> str:
    """``text`` without the configured secrets (for messages printed outside the logs)."""
    return redactor.text(text)


def secrets_of(settings: Settings) -> list[str]:
    """Every secret in the configuration: Kafka SASL and database passwords, ingest and Rocket.Chat credentials, app secrets."""
    found: list[str] = []
    password = settings.kafka.security.sasl_password
    if password is not None:
        found.append(password.get_secret_value())
    url = settings.persistence.url.get_secret_value()
    try:
        database_password = make_url(url).password
    except Exception:  # noqa: BLE001 - an unparsable URL is reported elsewhere; keep what the regex finds
        database_password = None
    if database_password:
        found.append(str(database_password))
    found.extend(_app_secrets(settings.handlers.settings))
    for secret in (settings.ingest.secret, settings.ingest.webhook_token, settings.rocketchat.auth_token):
        if secret.get_secret_value():
            found.append(secret.get_secret_value())
    return found


def _app_secrets(node: Any, secret: bool = False) -> Iterable[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _app_secrets(value, secret or bool(SECRET_NAME.search(str(key))))
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _app_secrets(value, secret)
    elif secret and isinstance(node, str):
        yield node


class LibraryFilter(logging.Filter):
    """Redacts the standard library's log lines and rate-limits aiokafka's repeats.

    While a broker is unreachable aiokafka logs the same connection errors hundreds of
    times a second; one line per message template every ``interval_s`` says as much.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record (redacted) unless it repeats an aiokafka line logged just before."""
        suppressed = 0
        if record.name.startswith("aiokafka"):
            key = (record.name, str(record.msg))
            now = time.monotonic()
            last, suppressed = self._last.get(key, (-self.interval_s, 0))
            if now - last < self.interval_s:
                self._last[key] = (last, suppressed + 1)
                return False
            if len(self._last) > 1000:  # templates are few; formatted messages are not
                self._last.clear()
            self._last[key] = (now, 0)
        message = record.getMessage()
        if suppressed:
            message += f" (repeated {suppressed} times in the last {self.interval_s:.0f}s)"
        record.msg, record.args = redactor.text(message), None
        return True


_library_filter = LibraryFilter()

# The event a dispatcher is running now, as (offset, event id): set once per event, which costs
# far less than binding structlog's context per event, and added to every line logged meanwhile.
current_event: ContextVar[tuple[int, str] | None] = ContextVar("rc_worker_current_event", default=None)


def add_current_event(_logger: Any, _method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Structlog processor: the offset and event id of the event being run, unless the line has its own."""
    found = current_event.get()
    if found is not None:
        event_dict.setdefault("offset", found[0])
        event_dict.setdefault("event_id", found[1])
    return event_dict


def configure(settings: LoggingSettings, secrets: Iterable[str] = ()) -> None:
    """Configure structlog (and stdlib logging, for aiokafka's own lines) once at start-up.

    Args:
        settings: level and format.
        secrets: values never to be written (see :func:`secrets_of`).

    """
    redactor.use(secrets)
    level = _LEVELS[settings.level]
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_current_event,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiokafka and SQLAlchemy log through the standard library; keep their warnings visible.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        if _library_filter not in handler.filters:
            handler.addFilter(_library_filter)


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A logger bound to ``name`` and any extra context."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name).bind(**context)
    return logger
