"""``rc-worker check-config``: the effective configuration, secrets redacted, and every problem.

Loading the settings already rejects unknown keys and bad values, listing each one. This
adds what no single key can say: that the enabled apps are installed and their settings
valid, and that the keys agree with each other (timeouts, topics, credentials). It also
renders the reference table of every key, its variable and its default for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlsplit

import yaml
from pydantic import BaseModel, SecretStr

from worker.config import ENV_DELIMITER, ENV_PREFIX, Settings, default_config_path
from worker.errors import PluginError
from worker.logs import SECRET_NAME  # values under keys named like this are redacted even when not SecretStr

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

REDACTED = "***"
# Kafka's own rule for topic names.
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


async def check_config_command(settings: Settings, args: argparse.Namespace) -> int:
    """Print the effective configuration (or the reference table) and every problem; 2 if any."""
    if args.reference:
        sys.stdout.write(reference_table() + "\n")
        return 0
    source = args.config if args.config is not None else default_config_path()
    overrides = sorted(name for name in os.environ if name.startswith(ENV_PREFIX) and name != f"{ENV_PREFIX}CONFIG")
    sys.stdout.write(f"# effective configuration; file: {source or 'none (defaults)'}\n")
    sys.stdout.write(f"# overridden by: {', '.join(overrides) or 'no RC_WORKER_* variable'}\n")
    available = _installed()
    sys.stdout.write(yaml.safe_dump(effective(settings, available), sort_keys=False, allow_unicode=True))
    found = problems(settings, available)
    if found:
        print(f"rc-worker: the configuration has {len(found)} problem(s):", file=sys.stderr)
        for problem in found:
            print("  - " + problem.replace("\n", "\n    "), file=sys.stderr)
        return 2
    print("rc-worker: the configuration is valid", file=sys.stderr)
    return 0


def effective(settings: Settings, available: Mapping[str, EntryPoint] | None = None) -> dict[str, Any]:
    """Every key with its value, secrets redacted, app settings validated with their defaults.

    ``available`` is the installed plugins when already found (None: look them up).
    """
    data: dict[str, Any] = _redact(settings.model_dump(mode="python"))
    data["persistence"]["url"] = redact_url(settings.persistence.url.get_secret_value())
    apps: dict[str, Any] = {}
    for app_id in settings.handlers.enabled:
        given = settings.handlers.settings.get(app_id, {})
        try:
            apps[app_id] = _redact(dict(_load_app(app_id, given, available).settings))
        except PluginError:
            if given:  # shown as given; problems() says what is wrong
                apps[app_id] = _redact(given)
    stray = {k: _redact(v) for k, v in settings.handlers.settings.items() if k not in apps}
    data["handlers"]["settings"] = {**apps, **stray}
    return data


def redact_url(url: str) -> str:
    """``url`` with its password (and any secret-looking query parameter) replaced by ***.

    Parsed with urllib, as SQLAlchemy reads such URLs (``dialect+driver://user:password@host:port/db?query``):
    importing SQLAlchemy here would cost check-config a third of a second of start-up.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        return REDACTED  # an unparsable URL is shown as a secret, never echoed
    user_info, at, host = parts.netloc.rpartition("@")
    user, colon, _ = user_info.partition(":")
    netloc = f"{user}:{REDACTED}@{host}" if at and colon else parts.netloc
    query = [(k, REDACTED if SECRET_NAME.search(k) else quote(v, safe="")) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    rendered = "&".join(f"{quote(k, safe='')}={v}" for k, v in query)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{rendered}" if rendered else "")


def problems(settings: Settings, available: Mapping[str, EntryPoint] | None = None) -> list[str]:
    """Everything that would stop or mislead a worker with these settings, one line each.

    ``available`` is the installed plugins when already found (None: look them up).
    """
    return [*_plugin_problems(settings, available), *_consistency_problems(settings)]


def _installed() -> Mapping[str, EntryPoint] | None:
    """The installed plugins, looked up once for the whole command; None when that fails (reported later)."""
    from worker.plugins import installed

    try:
        return installed()
    except PluginError:
        return None


def _plugin_problems(settings: Settings, available: Mapping[str, EntryPoint] | None) -> Iterator[str]:
    from worker.plugins import installed

    try:
        available = installed() if available is None else available
    except PluginError as exc:
        yield str(exc)
        return
    names = ", ".join(sorted(available)) or "none"
    for app_id in sorted(set(settings.handlers.settings) - set(available)):
        yield f"handlers.settings.{app_id}: no installed app has the id {app_id!r} (installed: {names}); fix the id or remove the section"
    for app_id in sorted(set(settings.handlers.settings) & set(available) - set(settings.handlers.enabled)):
        yield f"handlers.settings.{app_id}: app {app_id!r} is installed but not in handlers.enabled; enable it or remove the section"
    for app_id in settings.handlers.enabled:
        try:
            _load_app(app_id, settings.handlers.settings.get(app_id, {}), available)
        except PluginError as exc:
            yield str(exc)


def _consistency_problems(settings: Settings) -> Iterator[str]:
    kafka, processing, observability = settings.kafka, settings.processing, settings.observability
    security = kafka.security
    if kafka.heartbeat_interval_ms >= kafka.session_timeout_ms:
        yield (
            f"kafka.heartbeat_interval_ms ({kafka.heartbeat_interval_ms}) must be below kafka.session_timeout_ms "
            f"({kafka.session_timeout_ms}); a third of it is usual"
        )
    topics = {"kafka.topic": kafka.topic, "kafka.dead_letter_topic": kafka.dead_letter_topic, "kafka.commands_topic": kafka.commands_topic}
    for key, name in topics.items():
        if not _TOPIC_NAME.match(name):
            yield f"{key} ({name!r}) is not a valid Kafka topic name: use 1-249 letters, digits, '.', '_' or '-'"
    if len(set(topics.values())) < len(topics):
        yield "kafka.topic, kafka.dead_letter_topic and kafka.commands_topic must be three different topics"
    if security.protocol.startswith("SASL") and not (security.sasl_username and security.sasl_password):
        yield f"kafka.security.protocol is {security.protocol}: set kafka.security.sasl_username and sasl_password"
    for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
        path = getattr(security, key)
        if path and not Path(path).is_file():
            yield f"kafka.security.{key}: no file at {path}"
    if security.ssl_keyfile and not security.ssl_certfile:
        yield "kafka.security.ssl_keyfile is set without kafka.security.ssl_certfile"
    if processing.backoff_initial_ms > processing.backoff_max_ms:
        yield f"processing.backoff_initial_ms ({processing.backoff_initial_ms:g}) exceeds processing.backoff_max_ms ({processing.backoff_max_ms:g})"
    if observability.liveness_stall_s <= processing.handler_timeout_s:
        yield (
            f"observability.liveness_stall_s ({observability.liveness_stall_s:g}) must exceed processing.handler_timeout_s "
            f"({processing.handler_timeout_s:g}), or one slow handler run fails the liveness probe"
        )
    try:
        parts = urlsplit(settings.persistence.url.get_secret_value())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        yield f"persistence.url cannot be parsed: {type(exc).__name__}"


def _load_app(app_id: str, given: dict[str, Any], available: Mapping[str, EntryPoint] | None) -> Any:
    from worker.plugins import load_apps

    return load_apps([app_id], {app_id: given} if given else {}, available)[0]


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, SecretStr):
        return REDACTED
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="python")
    if isinstance(value, dict):
        return {k: _redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, key) for v in value]
    if value is not None and key and SECRET_NAME.search(key):
        return REDACTED
    return value


# -- the README's reference table -------------------------------------------------------------


def reference_rows(model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, str, str]]:
    """``(key, environment variable, default)`` for every leaf key of ``model``, in declaration order."""
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from reference_rows(annotation, path)
            continue
        env = ENV_PREFIX + ENV_DELIMITER.join(part.upper() for part in path)
        yield ".".join(path), env, _render_default(info.get_default(call_default_factory=True))


def reference_table() -> str:
    """The Markdown table of every key, its environment variable and its default."""
    lines = ["| key | environment variable | default |", "|---|---|---|"]
    lines += [f"| `{key}` | `{env}` | `{default}` |" for key, env, default in reference_rows()]
    return "\n".join(lines)


def _render_default(value: Any) -> str:
    if isinstance(value, SecretStr):
        value = redact_url(value.get_secret_value()) if "://" in value.get_secret_value() else REDACTED
    if isinstance(value, str):
        return value
    # As an RC_WORKER_* variable takes it: lists and mappings as JSON.
    return json.dumps(list(value) if isinstance(value, tuple) else value)
