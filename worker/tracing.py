"""Optional OpenTelemetry spans: one per batch, one per event inside it, one per handler run.

Off unless ``observability.tracing`` is true. OpenTelemetry is then imported here and only
here (``pip install 'rc-apps-worker[otel]'``), so the worker has no hard dependency on it;
while tracing is off, :func:`span` is a no-op context manager. Spans follow OpenTelemetry's
messaging conventions where one fits (``messaging.destination.partition.id`` and so on).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import structlog

from worker.errors import ConfigError

log = structlog.get_logger("worker.tracing")

SERVICE_NAME = "rc-worker"

# Short names at the call sites, OpenTelemetry's messaging attribute names on the spans.
_ATTRIBUTES = {
    "topic": "messaging.destination.name",
    "partition": "messaging.destination.partition.id",
    "records": "messaging.batch.message_count",
    "offset": "messaging.kafka.offset",
    "event_id": "messaging.message.id",
    "app": "rc_worker.app",
}

_tracer: Any = None
_provider: Any = None  # the SDK provider this module made, flushed by shutdown()


def configure(enabled: bool, provider: Any = None) -> None:
    """Turn spans on (``enabled``) or off; ``provider`` is a TracerProvider to use instead of the global one.

    Without ``provider``, an already configured global provider is used (as under
    ``opentelemetry-instrument``); otherwise one is made that exports over OTLP/HTTP to
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default http://localhost:4318).

    Raises:
        ConfigError: tracing is enabled but OpenTelemetry (the ``otel`` extra) is not installed.

    """
    global _tracer
    if not enabled:
        _tracer = None
        return
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigError(_missing("opentelemetry-api")) from exc
    chosen = provider if provider is not None else _global_provider(trace)
    _tracer = chosen.get_tracer("rc-worker", _version())
    log.info("tracing_enabled", provider=type(chosen).__name__)


def shutdown() -> None:
    """Flush and close the provider this module made, if any; spans stop."""
    global _tracer, _provider
    _tracer = None
    if _provider is not None:
        _provider.shutdown()
        _provider = None


def enabled() -> bool:
    """Whether spans are being recorded."""
    return _tracer is not None


def span(name: str, **attributes: str | int) -> contextlib.AbstractContextManager[Any]:
    """A span named ``name`` around the block, the current span its parent; a no-op while off.

    An exception leaving the block is recorded on the span and marks it as an error.
    """
    if _tracer is None:
        return contextlib.nullcontext()
    current: contextlib.AbstractContextManager[Any] = _tracer.start_as_current_span(
        name, attributes={_ATTRIBUTES.get(k, f"rc_worker.{k}"): v for k, v in attributes.items()}
    )
    return current


@contextlib.contextmanager
def enabled_with(provider: Any) -> Iterator[None]:
    """Tracing on with ``provider`` for the block, off afterwards (tests and embedding)."""
    configure(True, provider)
    try:
        yield
    finally:
        configure(False)


def _global_provider(trace: Any) -> Any:
    global _provider
    current = trace.get_tracer_provider()
    if not isinstance(current, trace.ProxyTracerProvider):
        return current  # configured by the application or opentelemetry-instrument
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(_missing(exc.name or "opentelemetry-sdk")) from exc
    # OTEL_SERVICE_NAME, when set, names the service; attributes passed here would override it.
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME})
    _provider = TracerProvider(resource=resource)
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(_provider)
    return _provider


def _missing(what: str) -> str:
    return (
        f"observability.tracing is true but {what} is not installed; "
        "pip install 'rc-apps-worker[otel]', or set observability.tracing false (RC_WORKER_OBSERVABILITY__TRACING=false)"
    )


def _version() -> str:
    try:
        return version("rc-apps-worker")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0"
