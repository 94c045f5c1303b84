"""worker.config: config.yaml plus RC_WORKER_* variables, validated once and frozen."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml
from pydantic import SecretStr

from tests.support import ROOT
from worker import constants
from worker.config import Settings, load_settings
from worker.errors import ConfigError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RC_WORKER_* variable of the caller's, and a working directory without config.yaml."""
    for name in [k for k in os.environ if k.startswith("RC_WORKER_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write_config(tmp_path: Path, document: dict[str, Any]) -> Path:
    """A config file holding ``document``."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class TestSources:
    """Where each value comes from: defaults, then the file, then the environment."""

    def test_defaults_apply_without_a_file(self) -> None:
        """No --config, no $RC_WORKER_CONFIG and no ./config.yaml: the built-in defaults."""
        settings = load_settings()
        assert settings.kafka.topic == constants.DEFAULT_TOPIC
        assert settings.persistence.url.get_secret_value() == constants.DEFAULT_DATABASE_URL
        assert settings.handlers.enabled == ("message-count",)

    def test_config_variable_names_the_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """$RC_WORKER_CONFIG is read when no path is given."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.setenv("RC_WORKER_CONFIG", str(write_config(elsewhere, {"kafka": {"topic": "from-file"}})))
        assert load_settings().kafka.topic == "from-file"

    def test_nested_variable_overrides_one_key_and_keeps_the_files_others(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """RC_WORKER_KAFKA__TOPIC replaces kafka.topic only; the file's other kafka keys stay."""
        path = write_config(tmp_path, {"kafka": {"topic": "file-topic", "group_id": "file-group"}})
        monkeypatch.setenv("RC_WORKER_KAFKA__TOPIC", "env-topic")
        settings = load_settings(path)
        assert (settings.kafka.topic, settings.kafka.group_id) == ("env-topic", "file-group")

    def test_variable_reaches_a_key_two_levels_down(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """RC_WORKER_KAFKA__SECURITY__SASL_USERNAME sets kafka.security.sasl_username."""
        monkeypatch.setenv("RC_WORKER_KAFKA__SECURITY__PROTOCOL", "SASL_PLAINTEXT")
        monkeypatch.setenv("RC_WORKER_KAFKA__SECURITY__SASL_USERNAME", "alice")
        security = load_settings().kafka.security
        assert (security.protocol, security.sasl_username) == ("SASL_PLAINTEXT", "alice")

    def test_numbers_from_variables_are_converted(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Variables are text; typed keys get their type."""
        monkeypatch.setenv("RC_WORKER_KAFKA__MAX_BATCH_RECORDS", "250")
        monkeypatch.setenv("RC_WORKER_PROCESSING__BACKOFF_MAX_MS", "12.5")
        settings = load_settings()
        assert settings.kafka.max_batch_records == 250
        assert settings.processing.backoff_max_ms == 12.5

    def test_lists_and_mappings_are_json(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """RC_WORKER_HANDLERS__ENABLED is a JSON list and RC_WORKER_HANDLERS__SETTINGS a JSON object."""
        monkeypatch.setenv("RC_WORKER_HANDLERS__ENABLED", '["b-app", "a-app"]')
        monkeypatch.setenv("RC_WORKER_HANDLERS__SETTINGS", '{"a-app": {"limit": 3}}')
        handlers = load_settings().handlers
        assert handlers.enabled == ("b-app", "a-app")  # the configured order is the run order
        assert handlers.settings == {"a-app": {"limit": 3}}

    def test_a_file_read_with_or_without_variables_gives_the_same_settings(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A variable that sets a key to the file's value changes nothing: one model, one validation, either way."""
        document = {"kafka": {"topic": "file-topic", "security": {"protocol": "SSL"}}, "handlers": {"enabled": ["mentions"]}}
        path = write_config(tmp_path, document)
        without = load_settings(path)
        monkeypatch.setenv("RC_WORKER_KAFKA__TOPIC", "file-topic")
        with_variable = load_settings(path)
        assert type(with_variable) is type(without) is Settings
        assert with_variable == without == Settings(**document)

    def test_a_variable_in_lower_case_overrides_too(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Names are matched regardless of case, as pydantic-settings always matched them."""
        monkeypatch.setenv("rc_worker_kafka__topic", "lower-topic")
        assert load_settings().kafka.topic == "lower-topic"

    def test_repository_config_documents_every_key(self) -> None:
        """config.yaml holds every key of the settings model, and only those."""

        def keys(model: type[pydantic.BaseModel], prefix: str = "") -> set[str]:
            found = set()
            for name, field in model.model_fields.items():
                annotation = field.annotation
                if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
                    found |= keys(annotation, f"{prefix}{name}.")
                else:
                    found.add(prefix + name)
            return found

        def documented(document: dict[str, Any], prefix: str = "") -> set[str]:
            found = set()
            for name, value in document.items():
                nested = isinstance(value, dict) and f"{prefix}{name}" != "handlers.settings"
                found |= documented(value, f"{prefix}{name}.") if nested else {prefix + name}
            return found

        document = yaml.safe_load((ROOT / "config.yaml").read_text())
        assert documented(document) == keys(Settings)
        load_settings(ROOT / "config.yaml")  # and it is valid as written


class TestFrozen:
    """Settings cannot change after start-up."""

    def test_sections_and_keys_cannot_be_assigned(self) -> None:
        """Assigning a key or a section raises instead of changing the running configuration."""
        settings = load_settings()
        with pytest.raises(pydantic.ValidationError, match="frozen"):
            settings.kafka.topic = "other"  # type: ignore[misc]
        with pytest.raises(pydantic.ValidationError, match="frozen"):
            settings.kafka = settings.kafka  # type: ignore[misc]


class TestSecrets:
    """Passwords stay out of reprs and logs."""

    def test_database_url_and_sasl_password_are_secret(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Both are SecretStr; the repr of the settings shows neither."""
        monkeypatch.setenv("RC_WORKER_PERSISTENCE__URL", "postgresql+asyncpg://worker:db-hunter2@127.0.0.1:5432/rc")
        monkeypatch.setenv("RC_WORKER_KAFKA__SECURITY__SASL_PASSWORD", "kafka-hunter2")
        settings = load_settings()
        assert isinstance(settings.persistence.url, SecretStr)
        assert isinstance(settings.kafka.security.sasl_password, SecretStr)
        assert settings.kafka.security.sasl_password.get_secret_value() == "kafka-hunter2"
        for shown in (repr(settings), str(settings), settings.model_dump_json()):
            assert "hunter2" not in shown


class TestInvalid:
    """Anything unknown or invalid stops loading with a ConfigError naming the key and its variable."""

    def test_unknown_key_in_the_file_is_named_with_its_variable(self, tmp_path: Path) -> None:
        """A misspelt key is reported with its path, its variable and the fix."""
        path = write_config(tmp_path, {"kafka": {"topik": "x"}})
        with pytest.raises(ConfigError) as refused:
            load_settings(path)
        assert f"in {path}" in str(refused.value)
        assert "kafka.topik (env RC_WORKER_KAFKA__TOPIK): unknown key" in str(refused.value)

    def test_unknown_section_is_refused(self, tmp_path: Path) -> None:
        """A whole unknown section is named too."""
        with pytest.raises(ConfigError, match=r"kafak \(env RC_WORKER_KAFAK\): unknown key"):
            load_settings(write_config(tmp_path, {"kafak": {"topic": "x"}}))

    def test_every_problem_is_listed_one_a_line(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Several bad values are all reported at once, each with its key."""
        monkeypatch.setenv("RC_WORKER_KAFKA__FETCH_TIMEOUT_MS", "soon")
        path = write_config(tmp_path, {"logging": {"level": "loud"}, "processing": {"handler_max_attempts": 0}})
        with pytest.raises(ConfigError) as refused:
            load_settings(path)
        lines = str(refused.value).splitlines()[1:]
        assert sorted(line.split(" (env ")[0].strip() for line in lines) == [
            "kafka.fetch_timeout_ms",
            "logging.level",
            "processing.handler_max_attempts",
        ]

    def test_database_url_needs_an_async_driver(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A URL without aiosqlite or asyncpg is refused with the drivers allowed."""
        monkeypatch.setenv("RC_WORKER_PERSISTENCE__URL", "postgresql://worker:pw@127.0.0.1/rc")
        with pytest.raises(ConfigError) as refused:
            load_settings()
        assert "persistence.url (env RC_WORKER_PERSISTENCE__URL)" in str(refused.value)
        assert "sqlite+aiosqlite://" in str(refused.value)
        assert "pw@" not in str(refused.value)

    def test_an_app_listed_twice_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each app runs once per event, so the list may name it once."""
        monkeypatch.setenv("RC_WORKER_HANDLERS__ENABLED", '["message-count", "message-count"]')
        with pytest.raises(ConfigError, match="'message-count' is listed twice"):
            load_settings()

    def test_a_list_variable_that_is_not_json_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A bare word where a JSON list belongs says that lists are JSON."""
        monkeypatch.setenv("RC_WORKER_HANDLERS__ENABLED", "message-count")
        with pytest.raises(ConfigError, match="JSON"):
            load_settings()

    @pytest.mark.parametrize(
        ("text", "problem"),
        [("kafka: [unclosed", "is not valid YAML"), ("- a\n- b\n", "must hold a mapping of sections, not list")],
    )
    def test_a_file_that_is_not_a_mapping_is_refused(self, tmp_path: Path, text: str, problem: str) -> None:
        """Broken YAML or a top level that is not sections is named with the file."""
        path = tmp_path / "config.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=problem):
            load_settings(path)

    def test_a_missing_file_is_named(self, tmp_path: Path) -> None:
        """A config path that does not exist says which and how to pass another."""
        with pytest.raises(ConfigError, match=r"cannot read config file .*absent\.yaml.*pass --config PATH"):
            load_settings(tmp_path / "absent.yaml")


class TestJsonVariables:
    def test_invalid_json_in_the_settings_variable_names_the_variable(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """RC_WORKER_HANDLERS__SETTINGS='{bad' names RC_WORKER_HANDLERS__SETTINGS and where its JSON breaks."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("RC_WORKER_HANDLERS__SETTINGS", "{bad")
        with pytest.raises(ConfigError, match=r"RC_WORKER_HANDLERS__SETTINGS \(handlers\.settings\) is not valid JSON \(.*\): '\{bad'"):
            load_settings(None)

    def test_only_the_broken_variable_is_named(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """A valid JSON list beside the broken object is not blamed."""
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("RC_WORKER_HANDLERS__ENABLED", '["mentions"]')
        monkeypatch.setenv("RC_WORKER_HANDLERS__SETTINGS", '{"mentions": }')
        with pytest.raises(ConfigError) as caught:
            load_settings(None)
        assert "RC_WORKER_HANDLERS__SETTINGS (handlers.settings) is not valid JSON" in str(caught.value)
        assert "RC_WORKER_HANDLERS__ENABLED" not in str(caught.value).split("; lists and mappings")[0]
