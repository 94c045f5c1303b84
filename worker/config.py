"""Typed settings, loaded once from config.yaml and RC_WORKER_* environment variables.

Every key of config.yaml can be overridden by ``RC_WORKER_<SECTION>__<KEY>`` (lists and
mappings as JSON). The result is validated once and frozen; anything unknown or invalid
stops start-up with a ConfigError that names the key, what was given and what is allowed.
"""

from __future__ import annotations

import functools
import json
import os
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from worker import constants
from worker.errors import ConfigError

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

ENV_PREFIX = "RC_WORKER_"
ENV_DELIMITER = "__"
# libyaml's loader when PyYAML was built with it: the same safe loading, several times faster on
# a commented config.yaml than the pure-Python one, which every command pays for at start-up.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Section(BaseModel):
    # Validators are built on first use, and the sections' defaults made only when a section is
    # missing (default_factory): building every model at import costs each command start-up.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class KafkaSecurity(_Section):
    """How the worker authenticates to Kafka; PLAINTEXT needs nothing else."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


class KafkaSettings(_Section):
    """Where events come from and where dead letters and commands go."""

    bootstrap_servers: str = constants.DEFAULT_BOOTSTRAP_SERVERS
    topic: str = Field(constants.DEFAULT_TOPIC, min_length=1)
    dead_letter_topic: str = Field(constants.DEFAULT_DEAD_LETTER_TOPIC, min_length=1)
    commands_topic: str = Field(constants.DEFAULT_COMMANDS_TOPIC, min_length=1)
    group_id: str = Field(constants.DEFAULT_GROUP_ID, min_length=1)
    group_instance_id: str | None = Field(None, min_length=1, description="static membership (KIP-345)")
    client_id: str = "rc-worker"
    max_batch_records: int = Field(500, ge=1, le=100_000)
    fetch_timeout_ms: int = Field(500, ge=10, le=60_000)
    fetch_max_wait_ms: int = Field(100, ge=0, le=60_000, description="the broker's long poll of a fetch that finds nothing new")
    session_timeout_ms: int = Field(10_000, ge=1_000, le=300_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=100_000)
    max_poll_interval_ms: int = Field(300_000, ge=1_000)
    request_timeout_ms: int = Field(30_000, ge=1_000)
    producer_max_request_bytes: int = Field(
        constants.KAFKA_DEFAULT_MAX_MESSAGE_BYTES + constants.RECORD_HEADROOM_BYTES,
        ge=constants.MAX_COMMAND_BYTES + constants.RECORD_HEADROOM_BYTES,
        description="the largest record the worker produces; at least the dead-letter topic's max.message.bytes",
    )
    security: KafkaSecurity = Field(default_factory=KafkaSecurity)


class PersistenceSettings(_Section):
    """The shared database: SQLite through aiosqlite, or PostgreSQL through asyncpg."""

    url: SecretStr = SecretStr(constants.DEFAULT_DATABASE_URL)
    busy_timeout_ms: int = Field(30_000, ge=0, description="SQLite: wait this long for a lock")
    pool_size: int = Field(5, ge=1, le=100)
    echo: bool = False
    processed_retention_hours: int = Field(168, ge=0, description="keep processed-event markers this long; 0 keeps them forever")
    prune_interval_s: float = Field(600.0, ge=0, description="how often a running worker prunes; 0: only `rc-worker db prune`")

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg:// (the async drivers this worker ships with)")
        return value


class ProcessingSettings(_Section):
    """Retries, timeouts and batching of the dispatch loop."""

    conflict_max_attempts: int = Field(20, ge=1, le=1000)
    handler_max_attempts: int = Field(3, ge=1, le=100)
    backoff_initial_ms: float = Field(5.0, ge=0)
    backoff_max_ms: float = Field(1_000.0, ge=0)
    handler_timeout_s: float = Field(30.0, gt=0)
    shutdown_timeout_s: float = Field(30.0, gt=0)


class HandlerSettings(_Section):
    """Which handler plugins run, in order, and the settings each one gets."""

    enabled: tuple[str, ...] = ("message-count",)
    settings: dict[str, dict[str, Any]] = {}

    @field_validator("enabled")
    @classmethod
    def _no_duplicates(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        seen: set[str] = set()
        for app_id in value:
            if app_id in seen:
                raise ValueError(f"app id {app_id!r} is listed twice; list each app once")
            seen.add(app_id)
        return value


class HttpSettings(_Section):
    """Limits of the ``http`` accessor handed to handlers."""

    timeout_s: float = Field(10.0, gt=0, le=300, description="per request, connect to last byte")
    max_response_bytes: int = Field(5_000_000, ge=1, description="a larger body fails the request with HttpError")


class LoggingSettings(_Section):
    """Log level and format; ``auto`` is JSON lines unless stderr is a terminal."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class ObservabilitySettings(_Section):
    """The worker's HTTP endpoint (/metrics, /healthz, /readyz), lag reporting and tracing."""

    enabled: bool = True
    host: str = Field("127.0.0.1", min_length=1, description="0.0.0.0 to be scraped from other hosts (containers)")
    port: int = Field(9464, ge=0, le=65535, description="0 picks a free port and logs it")
    liveness_stall_s: float = Field(120.0, gt=0, description="busy without progress this long fails /healthz")
    lag_interval_s: float = Field(15.0, gt=0, description="how often lag is measured and logged")
    tracing: bool = False
    web: bool = Field(False, description="also serve the status pages (rc-worker web) on this port")


class WebSettings(_Section):
    """The status pages of ``rc-worker web``: where they listen, and the token that allows re-drives."""

    host: str = Field("127.0.0.1", min_length=1, description="0.0.0.0 exposes the pages to other hosts")
    port: int = Field(8080, ge=0, le=65535, description="0 picks a free port and logs it")
    token: SecretStr | None = Field(None, description="allows re-drives from the pages; without it they are read-only")
    sample_interval_s: float = Field(5.0, gt=0, le=300, description="how often the pages sample offsets for the events/s chart")


class IngestSettings(_Section):
    """``rc-worker ingest``: the HTTP endpoint the Rocket.Chat App and outgoing webhooks post to."""

    host: str = Field("127.0.0.1", min_length=1, description="0.0.0.0 to take posts from other hosts (containers)")
    port: int = Field(8088, ge=0, le=65535, description="0 picks a free port and logs it")
    secret: SecretStr = Field(SecretStr(""), description="HMAC-SHA256 key shared with the app; empty refuses /v1/events")
    webhook_token: SecretStr = Field(SecretStr(""), description="the outgoing webhook's token; empty refuses /v1/webhooks/rocketchat")
    max_body_bytes: int = Field(constants.MAX_VALUE_BYTES, ge=1_024, le=constants.MAX_VALUE_BYTES, description="a larger body gets 413")
    produce_timeout_s: float = Field(10.0, gt=0, le=300, description="wait this long for the broker's acknowledgement, then 503")
    retry_after_s: int = Field(5, ge=1, le=3_600, description="the Retry-After of a 503")


class RocketChatSettings(_Section):
    """The Rocket.Chat server that ``rc-worker apply`` changes, and the app user the worker ignores."""

    url: str = Field("http://127.0.0.1:3000", min_length=1, description="the server's base URL (its Site URL)")
    user_id: str = Field("", description="X-User-Id of the account apply acts as")
    auth_token: SecretStr = Field(SecretStr(""), description="X-Auth-Token (a personal access token) of that account")
    timeout_s: float = Field(10.0, gt=0, le=300, description="per REST call, connect to last byte")
    app_user_id: str | None = Field(
        None,
        min_length=1,
        description=(
            "messages this user sent skip handlers (the loop guard) unless one sets handles_own_messages; "
            "it is the user get_app_user() answers, with or without user_id and auth_token"
        ),
    )
    apply_group_id: str = Field("rc-apps-worker-apply", min_length=1, description="consumer group of rc-worker apply")
    dead_letter_topic: str | None = Field(None, min_length=1, description="refused commands go here; default <commands_topic>.dlq")
    backoff_initial_s: float = Field(1.0, gt=0, description="first wait after a 429 or 5xx without Retry-After")
    backoff_max_s: float = Field(60.0, gt=0, description="longest wait between two tries of one command")

    @property
    def configured(self) -> bool:
        """True when the worker may call the REST API: user_id and auth_token are set (the readers' test)."""
        return bool(self.user_id and self.auth_token.get_secret_value())

    @field_validator("app_user_id", "dead_letter_topic", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        # An empty variable (compose's ${VAR:-}) means "not set", as null does in the file.
        return None if value == "" else value


class Settings(BaseModel):
    """The whole configuration; build it with :func:`load_settings`.

    ``Settings(**values)`` takes the RC_WORKER_* variables over ``values``, as load_settings
    takes them over the file's.
    """

    # validate_default as BaseSettings has it, so a Settings validates the same either way.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True, validate_default=True)
    # False in the pydantic-settings model below, which has read the variables already.
    _reads_environment: ClassVar[bool] = True

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    persistence: PersistenceSettings = Field(default_factory=PersistenceSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    handlers: HandlerSettings = Field(default_factory=HandlerSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    web: WebSettings = Field(default_factory=WebSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    rocketchat: RocketChatSettings = Field(default_factory=RocketChatSettings)

    def __init__(self, **values: Any) -> None:
        if type(self)._reads_environment and _overridden():
            # Its sections come out validated; validating them again here takes them as they are.
            merged = _environment_model()(**values)
            values = {name: getattr(merged, name) for name in merged.model_fields_set}
        super().__init__(**values)


def default_config_path() -> Path | None:
    """The config file used when none is named: $RC_WORKER_CONFIG, else ./config.yaml if any."""
    named = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if named:
        return Path(named)
    local = Path("config.yaml")
    return local if local.exists() else None


def load_settings(path: Path | None = None) -> Settings:
    """Load, validate and freeze the settings.

    Args:
        path: a YAML file; ``None`` means :func:`default_config_path`.

    Raises:
        ConfigError: the file is missing or unreadable, or a key is unknown or invalid.

    """
    path = path if path is not None else default_config_path()
    document: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_YAML_LOADER)  # noqa: S506 - a safe loader
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}; pass --config PATH") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        document = loaded or {}
    try:
        return Settings(**document)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, path)) from exc
    except _json_error() as exc:
        # Raised before validation when a list or mapping variable is not JSON; pydantic-settings
        # names the section only, so find the variable ourselves.
        broken = "".join(
            f"{name} ({_key_of(name)}) is not valid JSON ({problem}): {value!r}; " for name, value, problem in _json_variables_broken()
        )
        raise ConfigError(
            f"invalid configuration: {broken or f'{exc}; '}lists and mappings in {ENV_PREFIX}* variables are JSON, "
            f"e.g. {ENV_PREFIX}HANDLERS__ENABLED='[\"message-count\"]'"
        ) from exc


def _json_error() -> type[Exception]:
    """pydantic-settings' error for a variable that is not JSON; imported only once loading has failed."""
    from pydantic_settings import SettingsError

    return SettingsError


def _overridden() -> bool:
    """Whether a variable may override a key (pydantic-settings matches the names in any case)."""
    config = f"{ENV_PREFIX}CONFIG"
    return any(name.upper().startswith(ENV_PREFIX) and name.upper() != config for name in os.environ)


@functools.cache
def _environment_model() -> type[BaseSettings]:
    """Settings as a pydantic-settings model: made, and pydantic-settings imported, only when a variable is set."""
    # Importing pydantic-settings and building this model cost every command tens of milliseconds
    # of start-up, for variables most runs (and every check of a config.yaml) do not set.
    from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

    class EnvironmentSettings(BaseSettings, Settings):
        # The title keeps validation errors saying "for Settings", as they did.
        model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter=ENV_DELIMITER, title="Settings")
        _reads_environment: ClassVar[bool] = False

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            # The file's values arrive as init arguments; the environment overrides them.
            return (env_settings, init_settings)

    return EnvironmentSettings


def _json_variables_broken() -> list[tuple[str, str, str]]:
    """The RC_WORKER_* variables that must hold JSON (lists, mappings) and do not: name, value, problem."""
    broken = []
    for name, value in sorted(os.environ.items()):
        if not name.startswith(ENV_PREFIX) or not _takes_json(name[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER)):
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            broken.append((name, value if len(value) <= 60 else value[:57] + "...", str(exc)))
    return broken


def _key_of(variable: str) -> str:
    """The config key an RC_WORKER_* variable sets: RC_WORKER_HANDLERS__SETTINGS is handlers.settings."""
    return ".".join(variable[len(ENV_PREFIX) :].lower().split(ENV_DELIMITER))


def _takes_json(path: list[str]) -> bool:
    model: Any = Settings
    for depth, part in enumerate(path):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return depth > 0 and model is dict  # a key inside a mapping (handlers.settings.<app id>) holds JSON
        model = typing.get_origin(field.annotation) or field.annotation
    return model in (dict, list, tuple, set) or (isinstance(model, type) and issubclass(model, BaseModel))


def describe_validation_error(exc: ValidationError, path: Path | None) -> str:
    """One line per problem: the key's path, its env variable, what is wrong."""
    where = f" in {path}" if path else ""
    lines = [f"invalid configuration{where}:"]
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        env = ENV_PREFIX + ENV_DELIMITER.join(str(part).upper() for part in error["loc"])
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key; remove it or check its spelling against config.yaml"
        lines.append(f"  {key} (env {env}): {message}")
    return "\n".join(lines)
