"""The structlog processor chain: context variables first, JSON lines unless on a terminal.

The runner binds topic, partition, offset and event id with ``bound_contextvars``, so every
line logged while an event is processed, by the worker or by a handler, carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from worker.config import LoggingSettings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(settings: LoggingSettings) -> None:
    """Configure structlog (and stdlib logging, for aiokafka's own lines) once at start-up."""
    level = _LEVELS[settings.level]
    as_json = settings.format == "json" or (settings.format == "auto" and not sys.stderr.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiokafka and SQLAlchemy log through the standard library; keep their warnings visible.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")


def get_logger(name: str, **context: Any) -> structlog.stdlib.BoundLogger:
    """A logger bound to ``name`` and any extra context."""
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name).bind(**context)
    return logger
