"""Find the enabled handler plugins through their entry points, once, and fail fast.

A plugin is any installed distribution exposing an ``App`` subclass under the entry-point
group ``rc_worker.handlers``; the entry point's name is the app id. The built-in handlers
are registered exactly the same way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from worker import constants
from worker.apps import App
from worker.errors import PluginError


@dataclass(frozen=True, slots=True)
class Installed:
    """One installed plugin: its app id, where it comes from, and its version."""

    id: str
    entry_point: EntryPoint
    distribution: str
    version: str


def installed() -> dict[str, Installed]:
    """Every installed plugin by app id; two distributions claiming one id is an error."""
    found: dict[str, Installed] = {}
    for entry_point in entry_points(group=constants.HANDLER_ENTRY_POINT_GROUP):
        dist = entry_point.dist
        plugin = Installed(entry_point.name, entry_point, dist.name if dist else "?", dist.version if dist else "?")
        if plugin.id in found and found[plugin.id].entry_point.value != entry_point.value:
            raise PluginError(
                f"app id {plugin.id!r} is registered twice: by {found[plugin.id].distribution} "
                f"({found[plugin.id].entry_point.value}) and by {plugin.distribution} ({entry_point.value}); "
                "uninstall one of them or rename its entry point"
            )
        found[plugin.id] = plugin
    return found


def load_apps(enabled: Sequence[str], settings: Mapping[str, Mapping[str, Any]]) -> list[App]:
    """Instantiate and bind the enabled apps, in the configured order.

    Raises:
        PluginError: an app is not installed, cannot be imported, is not an App, or its
            settings are invalid; the message names the app and the fix.

    """
    available = installed()
    apps = []
    for app_id in enabled:
        if app_id not in available:
            names = ", ".join(sorted(available)) or "none"
            raise PluginError(
                f"handlers.enabled lists {app_id!r}, which is not installed (installed: {names}); "
                f"pip install the package that provides it, or remove it from handlers.enabled"
            )
        apps.append(_instantiate(available[app_id], settings.get(app_id, {})))
    return apps


def validate_settings(app_class: type[App], app_id: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``handlers.settings.<app_id>`` against what the app declares; returns the full settings."""
    model = app_class.settings_model
    if model is None:
        if given:
            raise PluginError(f"handlers.settings.{app_id}: this app declares no settings; remove the section")
        return {}
    try:
        return model.model_validate(dict(given)).model_dump()
    except ValidationError as exc:
        problems = "; ".join(
            f"handlers.settings.{app_id}.{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors()
        )
        raise PluginError(f"invalid settings for app {app_id!r}: {problems}") from None


def _instantiate(plugin: Installed, given: Mapping[str, Any]) -> App:
    try:
        app_class = plugin.entry_point.load()
    except Exception as exc:
        raise PluginError(f"cannot import app {plugin.id!r} from {plugin.entry_point.value}: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(app_class, type) and issubclass(app_class, App)):
        raise PluginError(f"app {plugin.id!r}: {plugin.entry_point.value} is not a subclass of worker.App")
    if app_class.execute_post_message_sent is App.execute_post_message_sent:
        raise PluginError(f"app {plugin.id!r}: {app_class.__name__} does not define execute_post_message_sent")
    try:
        app = app_class()
    except TypeError as exc:
        raise PluginError(f"app {plugin.id!r}: {app_class.__name__}() must take no arguments ({exc})") from exc
    app.bind(plugin.id, validate_settings(app_class, plugin.id, given))
    return app
