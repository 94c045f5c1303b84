"""The structlog processor chain: context variables first, secrets redacted, JSON lines unless on a terminal.

The runner binds topic, partition, offset and event id with ``bound_contextvars``, so every
line logged while an event is processed, by the worker or by a handler, carries them.
Passwords from the configuration (and any ``scheme://user:password@`` in a message) are
replaced by ``***`` in every line, the worker's and its libraries', and in ``rc-worker``'s
error messages.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO, cast
from urllib.parse import unquote, urlsplit

from worker.config import LoggingSettings, Settings

if TYPE_CHECKING:
    import structlog

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
    # Parsed as SQLAlchemy's make_url does (user info percent-decoded) without importing SQLAlchemy,
    # which would cost every command, --help included, a third of a second.
    url = settings.persistence.url.get_secret_value()
    try:
        database_password = urlsplit(url).password
    except ValueError:  # an unparsable URL is reported elsewhere; keep what the regex finds
        database_password = None
    if database_password:
        found.append(unquote(database_password))
    found.extend(_app_secrets(settings.handlers.settings))
    if settings.web.token is not None:
        found.append(settings.web.token.get_secret_value())
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


def as_json(settings: LoggingSettings) -> bool:
    """Whether log lines are JSON: asked for, or ``auto`` and stderr is not a terminal."""
    return settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())


class Console:
    """stderr for log lines, which a progress display can keep clear of itself.

    A log line (``--verbose``, a warning) written while a progress bar is drawn would land in
    the middle of the bar's line: the display sets :attr:`around_write` to what clears the bar
    before a write and redraws it after (tqdm's ``external_write_mode``), and unsets it when done.
    """

    def __init__(self) -> None:
        self.around_write: Callable[[], AbstractContextManager[object]] | None = None

    def write(self, text: str) -> int:
        """Write ``text`` to stderr, clear of the progress display."""
        if self.around_write is None:
            return sys.stderr.write(text)
        with self.around_write():
            return sys.stderr.write(text)

    def flush(self) -> None:
        """Flush stderr."""
        sys.stderr.flush()

    def isatty(self) -> bool:
        """Whether stderr is a terminal."""
        return sys.stderr.isatty()


console = Console()
"""Where log lines go: stderr, kept clear of a progress bar while one is drawn."""
# What structlog and logging are handed: write, flush and isatty are all they use of a stream.
_stream = cast(TextIO, console)


def configure(settings: LoggingSettings, secrets: Iterable[str] = (), level: str | None = None) -> None:
    """Configure structlog (and stdlib logging, for aiokafka's own lines) once at start-up.

    Args:
        settings: level and format.
        secrets: values never to be written (see :func:`secrets_of`).
        level: overrides ``settings.level`` (``--quiet``, ``--verbose``).

    """
    redactor.use(secrets)
    numeric_level = _LEVELS[level or settings.level]
    # structlog is configured as soon as something imports it: importing it here would cost
    # the commands that never log (check-config, handlers) its import, and rich's with it.
    after_import("structlog", lambda: _configure_structlog(as_json(settings), numeric_level))
    # aiokafka and SQLAlchemy log through the standard library; keep their warnings visible.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=_stream, format="%(name)s %(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        if _library_filter not in handler.filters:
            handler.addFilter(_library_filter)


def _configure_structlog(json_lines: bool, numeric_level: int) -> None:
    import structlog

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_current_event,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=_stream),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A logger bound to ``name`` and any extra context."""
    import structlog

    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name).bind(**context)
    return logger


def after_import(name: str, then: Callable[[], None]) -> None:
    """Call ``then`` now if module ``name`` is imported, else right after whoever imports it first does.

    A later call for the same module replaces an earlier one still waiting.
    """
    for finder in [f for f in sys.meta_path if isinstance(f, _AfterImport) and f.name == name]:
        sys.meta_path.remove(finder)
    if name in sys.modules:
        then()
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds ``name`` through the other finders, and has its loader call ``then`` once it has run the module."""

    def __init__(self, name: str, then: Callable[[], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once, and out of the way of the lookup below
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self.then)
        return spec


class _ThenLoader(importlib.abc.Loader):
    """Loads as ``loader`` does, then calls ``then``; anything else is asked of ``loader``."""

    def __init__(self, loader: importlib.abc.Loader, then: Callable[[], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)
