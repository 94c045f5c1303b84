"""Plugin discovery and start-up checks: entry points, app classes, settings, `rc-worker handlers`."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import rc_worker, write_distribution
from worker.apps.contract import SettingsReader
from worker.errors import PluginError
from worker.plugins import distribution, installed, load_apps, validate_settings

PLUGIN_SOURCE = """
from pydantic import BaseModel, Field

from worker import App


class Settings(BaseModel):
    greeting: str = "hello"
    limit: int = Field(3, ge=1, description="how many")
    token: str


class Good(App):
    settings_model = Settings

    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        return None


class Plain(App):
    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        return None


class NeedsUrl(App):
    def __init__(self, url):
        self.url = url

    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        return None


class Exploding(App):
    def __init__(self):
        raise RuntimeError("boom")

    async def execute_post_message_sent(self, message, read, http, persistence, modify):
        return None


class NoExecute(App):
    pass


class NotAnApp:
    pass
"""

Install = Callable[..., str]


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory on sys.path where fake distributions are installed; their modules are forgotten after."""
    directory = tmp_path / "site"
    directory.mkdir()
    monkeypatch.syspath_prepend(str(directory))
    before = set(sys.modules)
    yield directory
    for name in set(sys.modules) - before:
        if name.startswith("fakeplugin_"):
            del sys.modules[name]


@pytest.fixture
def install(plugin_dir: Path) -> Install:
    """Install a fake distribution whose entry points name classes of PLUGIN_SOURCE; returns the module name."""

    def _install(dist: str, entries: dict[str, str], source: str = PLUGIN_SOURCE) -> str:
        module = f"fakeplugin_{uuid.uuid4().hex[:8]}"
        write_distribution(plugin_dir / dist, dist, {k: f"{module}:{v}" for k, v in entries.items()}, {module: source})
        sys.path.insert(0, str(plugin_dir / dist))
        return module

    return _install


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    saved = list(sys.path)
    yield
    sys.path[:] = saved


class TestDiscovery:
    def test_built_in_handlers_are_installed_through_entry_points(self) -> None:
        """message-count and mentions are found like any plugin, with their distribution and version."""
        found = installed()
        assert found["message-count"].value == "handlers.message_count:MessageCount"
        name, version = distribution(found["mentions"])
        assert name == "rc-apps-worker"
        assert version

    def test_apps_are_created_in_the_configured_order_and_bound(self) -> None:
        """load_apps follows handlers.enabled and gives each app its id, settings and logger."""
        apps = load_apps(["mentions", "message-count"], {})
        assert [app.id for app in apps] == ["mentions", "message-count"]
        assert apps[0].settings["ignored"] == ["all", "here"]

    def test_an_app_registered_by_two_distributions_stops_start_up(self, install: Install) -> None:
        """Two distributions claiming one app id: the error names both and the fix."""
        install("first-dist", {"twice": "Plain"})
        install("second-dist", {"twice": "Plain"})
        with pytest.raises(PluginError, match=r"'twice' is registered twice.*uninstall one") as caught:
            load_apps(["twice"], {})
        assert "by first-dist" in str(caught.value)
        assert "by second-dist" in str(caught.value)

    def test_an_enabled_app_that_is_not_installed_stops_start_up(self) -> None:
        """The error names the app, what is installed, and both fixes."""
        with pytest.raises(
            PluginError, match=r"'nope', which is not installed \(installed: .*message-count.*pip install.*handlers\.enabled"
        ):
            load_apps(["message-count", "nope"], {})


class TestAppClasses:
    @pytest.mark.parametrize(
        ("target", "message"),
        [
            ("NotAnApp", r"is not a subclass of worker\.App"),
            ("NeedsUrl", r"NeedsUrl\(\) requires url; .*settings_model"),
            ("NoExecute", r"does not define execute_post_message_sent"),
            ("Exploding", r"Exploding\(\) raised RuntimeError: boom"),
            ("Missing", r"cannot import app 'broken'.*AttributeError"),
        ],
    )
    def test_an_unusable_class_stops_start_up_with_the_reason(self, install: Install, target: str, message: str) -> None:
        """Not an App, required constructor arguments, no execute method, a failing constructor, a bad entry point."""
        install("broken-dist", {"broken": target})
        with pytest.raises(PluginError, match=message):
            load_apps(["broken"], {})

    def test_a_module_that_fails_to_import_is_reported_with_its_error(self, install: Install) -> None:
        """The import error's type and text are in the message."""
        install("syntax-dist", {"broken": "Plain"}, source="raise ImportError('needs libfoo')\n")
        with pytest.raises(PluginError, match=r"cannot import app 'broken'.*ImportError: needs libfoo"):
            load_apps(["broken"], {})


class TestSettings:
    def test_defaults_fill_what_is_not_configured(self, install: Install) -> None:
        """Validated settings carry every field: given values converted, defaults for the rest."""
        install("good-dist", {"good": "Good"})
        [app] = load_apps(["good"], {"good": {"token": "t", "limit": "5"}})
        assert dict(app.settings) == {"greeting": "hello", "limit": 5, "token": "t"}
        assert SettingsReader(app.settings).get_value_by_id("limit") == 5

    def test_reading_an_undeclared_setting_names_the_declared_ones(self) -> None:
        """get_value_by_id of an unknown id says which ids exist."""
        with pytest.raises(KeyError, match=r"no setting 'colour'; this app has: greeting, limit"):
            SettingsReader({"greeting": "hi", "limit": 1}).get_value_by_id("colour")

    def test_settings_are_read_only(self, install: Install) -> None:
        """A handler cannot change its settings (they are shared by every run)."""
        install("good-dist", {"good": "Good"})
        [app] = load_apps(["good"], {"good": {"token": "t"}})
        with pytest.raises(TypeError):
            app.settings["limit"] = 9  # type: ignore[index]

    def test_a_wrong_type_names_the_key_the_value_and_the_fix(self, install: Install) -> None:
        """The message names handlers.settings.<id>.<key>, what was given, what is expected, where to fix it."""
        install("good-dist", {"good": "Good"})
        with pytest.raises(PluginError) as caught:
            load_apps(["good"], {"good": {"token": "t", "limit": "many"}})
        text = str(caught.value)
        assert "handlers.settings.good.limit: Input should be a valid integer" in text
        assert "(given 'many'; expected int)" in text
        assert "config.yaml under handlers.settings.good" in text

    def test_a_missing_required_setting_is_named(self, install: Install) -> None:
        """A required field without a value: handlers.settings.<id>.<key> is required."""
        install("good-dist", {"good": "Good"})
        with pytest.raises(PluginError, match=r"handlers\.settings\.good\.token: required, and not set"):
            load_apps(["good"], {})

    def test_an_unknown_setting_lists_the_accepted_ones(self, install: Install) -> None:
        """A misspelt key is an error, not silently ignored."""
        install("good-dist", {"good": "Good"})
        with pytest.raises(PluginError, match=r"handlers\.settings\.good\.limt: unknown setting; good accepts: greeting, limit, token"):
            load_apps(["good"], {"good": {"token": "t", "limt": 2}})

    def test_a_constraint_violation_is_named(self, install: Install) -> None:
        """Field constraints (ge=1) are checked too."""
        install("good-dist", {"good": "Good"})
        with pytest.raises(PluginError, match=r"handlers\.settings\.good\.limit: Input should be greater than or equal to 1"):
            load_apps(["good"], {"good": {"token": "t", "limit": 0}})

    def test_settings_for_an_app_without_a_settings_model_are_refused(self) -> None:
        """An app that declares no settings accepts none."""
        from handlers.message_count import MessageCount

        with pytest.raises(PluginError, match=r"handlers\.settings\.message-count: .*declares no settings.*remove the section"):
            validate_settings(MessageCount, "message-count", {"x": 1})

    def test_settings_for_an_app_that_is_not_installed_are_refused(self) -> None:
        """A settings section under a misspelt app id stops start-up instead of being ignored."""
        with pytest.raises(PluginError, match=r"handlers\.settings\.mentons: no installed app has the id 'mentons'"):
            load_apps(["message-count"], {"mentons": {"max_per_message": 3}})


class TestCommands:
    def test_run_with_invalid_settings_exits_2_naming_the_key(self, tmp_path: Path) -> None:
        """`rc-worker run` stops before connecting to anything, with the key in the message."""
        env = {
            **os.environ,
            "RC_WORKER_PERSISTENCE__URL": f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
            "RC_WORKER_HANDLERS__ENABLED": '["mentions"]',
            "RC_WORKER_HANDLERS__SETTINGS": '{"mentions": {"max_per_message": "ten"}}',
        }
        result = rc_worker("run", env=env, check=False, timeout=60)
        assert result.returncode == 2
        assert "handlers.settings.mentions.max_per_message" in result.stderr

    def test_handlers_lists_plugins_with_settings_and_enabled_state(self, plugin_dir: Path) -> None:
        """--json: id, distribution, version, settings with defaults and configured values, enabled and position."""
        module = f"fakeplugin_{uuid.uuid4().hex[:8]}"
        write_distribution(plugin_dir, "fake-dist", {"fake": f"{module}:Good"}, {module: PLUGIN_SOURCE})
        env = {
            **os.environ,
            "PYTHONPATH": str(plugin_dir),
            "RC_WORKER_HANDLERS__ENABLED": '["fake", "message-count"]',
            "RC_WORKER_HANDLERS__SETTINGS": '{"fake": {"token": "s3cret", "limit": 7}}',
        }
        listed = {item["id"]: item for item in json.loads(rc_worker("handlers", "--json", env=env).stdout)}
        fake = listed["fake"]
        assert (fake["distribution"], fake["version"], fake["enabled"], fake["position"]) == ("fake-dist", "1.0", True, 1)
        settings = {s["name"]: s for s in fake["settings"]}
        assert settings["limit"] == {"name": "limit", "type": "int", "required": False, "default": 3, "description": "how many", "value": 7}
        assert settings["token"]["required"] is True
        assert listed["message-count"]["position"] == 2
        assert listed["mentions"]["enabled"] is False
        assert fake["problem"] is None

    def test_handlers_exits_2_when_an_enabled_app_cannot_run(self) -> None:
        """An enabled app that is missing is listed with the fix, and the exit status says so."""
        env = {**os.environ, "RC_WORKER_HANDLERS__ENABLED": '["message-count", "ghost"]'}
        result = rc_worker("handlers", env=env, check=False)
        assert result.returncode == 2
        assert "ghost  (not installed)  enabled, runs 2 of 2" in result.stdout
        assert "pip install the package that provides it" in result.stdout
