"""Find the enabled handler plugins through their entry points, once, and fail fast.

A plugin is any installed distribution exposing an ``App`` subclass under the entry-point
group ``rc_worker.handlers``; the entry point's name is the app id. The built-in handlers
are registered exactly the same way. Everything that would stop an app from running (not
installed, registered twice, not an App, a constructor that needs arguments, invalid
settings) is found here, at start-up, and reported as a PluginError that names the fix.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import Distribution, EntryPoint, entry_points
from typing import Any

import orjson
from pydantic import BaseModel, ValidationError

from worker import constants, limits
from worker.apps.contract import App
from worker.config import HandlerSettings, Settings
from worker.errors import PluginError

_SETTINGS_FIX = "set them in config.yaml under handlers.settings.{id} (or in RC_WORKER_HANDLERS__SETTINGS, as JSON)"


def installed() -> dict[str, EntryPoint]:
    """Every installed plugin's entry point by app id (the entry point's name), sorted by id.

    Raises:
        PluginError: two distributions register the same app id.

    """
    found: dict[str, EntryPoint] = {}
    for entry_point in _entry_points(tuple(sys.path)):
        other = found.get(entry_point.name)
        if other is not None and distribution(other)[0] != distribution(entry_point)[0]:
            raise PluginError(
                f"app id {entry_point.name!r} is registered twice under {constants.HANDLER_ENTRY_POINT_GROUP}: by "
                f"{distribution(other)[0]} ({other.value}) and by {distribution(entry_point)[0]} ({entry_point.value}); "
                "uninstall one of them or rename its entry point"
            )
        found[entry_point.name] = entry_point
    return dict(sorted(found.items()))


def distribution(entry_point: EntryPoint) -> tuple[str, str]:
    """The name and version of the distribution that registers ``entry_point`` ("?" when not known)."""
    dist = entry_point.dist
    return _name_and_version(dist) if dist else ("?", "?")


@functools.lru_cache(maxsize=16)
def _entry_points(path: tuple[str, ...]) -> tuple[EntryPoint, ...]:
    """The group's entry points as found on ``path`` (sys.path), read once per path.

    Reading them opens every installed distribution's metadata; keyed on sys.path, a
    distribution put on the path later (tests, a plugin directory) is still found.
    """
    return tuple(entry_points(group=constants.HANDLER_ENTRY_POINT_GROUP))


@functools.lru_cache(maxsize=64)
def _name_and_version(dist: Distribution) -> tuple[str, str]:
    # dist.name and dist.version each parse the whole METADATA file (a README included); once is enough.
    metadata = dist.metadata
    return metadata["Name"], metadata["Version"]


def load_apps(
    enabled: Sequence[str], settings: Mapping[str, Mapping[str, Any]], available: Mapping[str, EntryPoint] | None = None
) -> list[App]:
    """Instantiate and bind the enabled apps, in the configured order.

    Args:
        enabled: ``handlers.enabled``: app ids, in the order they run.
        settings: ``handlers.settings``: each app's settings by app id.
        available: what :func:`installed` returned, when the caller has it already (reading
            every distribution's entry points again costs milliseconds each time).

    Raises:
        PluginError: an app is not installed or registered twice, cannot be imported, is not
            an App, cannot be created without arguments, or its settings are invalid; the
            message names the app, the config key and the fix.

    """
    available = installed() if available is None else available
    stray = sorted(set(settings) - set(available))
    if stray:
        raise PluginError(
            f"handlers.settings.{stray[0]}: no installed app has the id {stray[0]!r} "
            f"(installed: {_names(available)}); fix the id or remove the section"
        )
    apps = []
    for app_id in enabled:
        if app_id not in available:
            raise PluginError(
                f"handlers.enabled lists {app_id!r}, which is not installed (installed: {_names(available)}); "
                "pip install the package that provides it, or remove it from handlers.enabled"
            )
        app_class = load_class(available[app_id])
        apps.append(instantiate(app_class, app_id, settings.get(app_id, {})))
    return apps


def load_class(plugin: EntryPoint) -> type[App]:
    """Import a plugin's class and check that it is a usable App subclass.

    Raises:
        PluginError: it cannot be imported, is not an App subclass, does not define
            ``execute_post_message_sent``, or its constructor requires arguments.

    """
    name, version = distribution(plugin)
    where = f"{plugin.value} (from {name} {version})"
    try:
        app_class = plugin.load()
    except Exception as exc:  # a plugin's import may raise anything
        raise PluginError(
            f"cannot import app {plugin.name!r} from {where}: {type(exc).__name__}: {exc}; fix or reinstall the plugin"
        ) from exc
    check_class(app_class, plugin.name, where)
    return app_class  # type: ignore[no-any-return]


def check_class(app_class: object, app_id: str, where: str = "") -> None:
    """Raise PluginError unless ``app_class`` is an App subclass the runtime can create and run."""
    where = where or repr(app_class)
    problem = limits.text_problem(app_id, limits.APP_ID_MAX)
    if problem is not None:
        raise PluginError(f"app id {app_id[:60]!r} {problem}: the database stores it with every record; register a shorter name")
    if not (isinstance(app_class, type) and issubclass(app_class, App)):
        raise PluginError(f"app {app_id!r}: {where} is not a subclass of worker.App; point the entry point at your App subclass")
    defined = app_class.defined_event_types()
    if not defined:
        raise PluginError(
            f"app {app_id!r}: {app_class.__name__} does not define execute_post_message_sent (nor "
            "execute_post_message_updated, execute_post_message_deleted); add the one for the events it takes"
        )
    _check_async(app_class, app_id)
    declared = app_class.event_types
    if declared is not None and not (isinstance(declared, frozenset | set) and declared <= defined):
        raise PluginError(
            f"app {app_id!r}: {app_class.__name__}.event_types must be a set of the types whose execute_ method it defines "
            f"({', '.join(sorted(defined))}), not {declared!r}"
        )
    required = _required_parameters(app_class)
    if required:
        raise PluginError(
            f"app {app_id!r}: {app_class.__name__}() requires {', '.join(required)}; the runtime creates apps without "
            "arguments: take configuration from settings_model instead"
        )
    model = app_class.settings_model
    if model is not None and not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise PluginError(f"app {app_id!r}: {app_class.__name__}.settings_model must be a pydantic BaseModel subclass, not {model!r}")


def instantiate(app_class: type[App], app_id: str, given: Mapping[str, Any]) -> App:
    """Create ``app_class`` with no arguments and bind it to ``app_id`` and its validated settings.

    Raises:
        PluginError: the class is not usable (see :func:`check_class`), its constructor
            raised, or ``given`` is not valid for its ``settings_model``.

    """
    check_class(app_class, app_id)
    values = validate_settings(app_class, app_id, given)
    try:
        app = app_class()
    except Exception as exc:  # a plugin's constructor may raise anything
        raise PluginError(f"app {app_id!r}: {app_class.__name__}() raised {type(exc).__name__}: {exc}") from exc
    app.bind(app_id, values)
    return app


def validate_settings(app_class: type[App], app_id: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``handlers.settings.<app_id>`` against what the app declares.

    Returns:
        Every setting the app declares, by field name: the given value, validated and
        converted, or the default.

    Raises:
        PluginError: a key is unknown, a value has the wrong type, or a required setting is
            missing; one line per problem, each naming ``handlers.settings.<app_id>.<key>``.

    """
    model = app_class.settings_model
    if model is None:
        if given:
            raise PluginError(
                f"handlers.settings.{app_id}: app {app_id!r} declares no settings (its class has no settings_model); remove the section"
            )
        return {}
    problems = [
        f"handlers.settings.{app_id}.{key}: unknown setting; {app_id} accepts: {_accepted(model)}" for key in _unknown(model, given)
    ]
    try:
        values = model.model_validate(dict(given)).model_dump()
    except ValidationError as exc:
        problems += [_problem(app_id, model, error) for error in exc.errors()]
        values = {}
    if problems:
        fix = _SETTINGS_FIX.format(id=app_id)
        raise PluginError(f"invalid settings for app {app_id!r}:\n  " + "\n  ".join(problems) + f"\n{fix}")
    return values


@dataclass(slots=True)
class PluginInfo:
    """What ``rc-worker handlers`` shows about one plugin."""

    id: str
    distribution: str | None
    version: str | None
    entry_point: str | None
    enabled: bool
    position: int | None
    # One setting an app declares, and its effective value under the current config, as
    # `rc-worker handlers --json` shows it: name, type, required, default, description, value.
    settings: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


def describe(handlers: HandlerSettings) -> list[PluginInfo]:
    """Every installed plugin, and every enabled one that is not, with settings and problems."""
    try:
        available = installed()
    except PluginError as exc:
        return [PluginInfo("?", None, None, None, enabled=False, position=None, problem=str(exc))]
    order = {app_id: n for n, app_id in enumerate(handlers.enabled, start=1)}
    found = []
    for app_id, plugin in available.items():
        info = PluginInfo(app_id, *distribution(plugin), plugin.value, app_id in order, order.get(app_id))
        given = handlers.settings.get(app_id, {})
        try:
            app_class = load_class(plugin)
            info.settings = _setting_infos(app_class, given)
            validate_settings(app_class, app_id, given)
        except PluginError as exc:
            info.problem = str(exc)
        found.append(info)
    for app_id in handlers.enabled:
        if app_id not in available:
            problem = "listed in handlers.enabled but not installed; pip install the package that provides it, or remove it"
            found.append(PluginInfo(app_id, None, None, None, enabled=True, position=order[app_id], problem=problem))
    return found


async def handlers_command(settings: Settings, args: argparse.Namespace) -> int:
    """``rc-worker handlers [--json]``: list the installed plugins; exit 2 if an enabled one cannot run."""
    infos = describe(settings.handlers)
    if args.json:
        sys.stdout.write(orjson.dumps([_as_json(info) for info in infos], default=repr, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(_as_text(infos))
    broken = [info for info in infos if info.problem and (info.enabled or info.id == "?")]
    return 2 if broken else 0


# -- internals ---------------------------------------------------------------------------


def _check_async(app_class: type[App], app_id: str) -> None:
    # The dispatcher awaits what these return; a plain def would fail on every event with
    # "object NoneType can't be used in 'await' expression", far from the cause.
    for name in sorted(vars(App)):
        if not name.startswith(("execute_", "check_")):
            continue
        method = getattr(app_class, name)
        if method is not getattr(App, name) and not inspect.iscoroutinefunction(method):
            raise PluginError(
                f"app {app_id!r}: {app_class.__name__}.{name} is not async; write `async def {name}(...)` "
                "(the worker awaits it, and a handler awaits its accessors inside it)"
            )


def _names(available: Mapping[str, EntryPoint]) -> str:
    return ", ".join(available) or "none"


def _required_parameters(app_class: type[App]) -> list[str]:
    if type(app_class).__call__ is type.__call__ and app_class.__init__ is object.__init__ and app_class.__new__ is object.__new__:
        # Most apps define no constructor: nothing is required, and inspect would parse
        # object's text signature (compiling tokenize's patterns) to say so.
        return []
    try:
        signature = inspect.signature(app_class)
    except (TypeError, ValueError):  # builtins without a signature take no arguments we know of
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.default is inspect.Parameter.empty and p.kind not in variadic]


def _accepted(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields) or "nothing"


def _unknown(model: type[BaseModel], given: Mapping[str, Any]) -> list[str]:
    if model.model_config.get("extra") == "allow":
        return []
    known = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
    return sorted(str(key) for key in given if key not in known)


def _problem(app_id: str, model: type[BaseModel], error: Any) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "missing":
        return f"handlers.settings.{app_id}.{location}: required, and not set"
    top = model.model_fields.get(str(error["loc"][0])) if error["loc"] else None
    expected = f"; expected {_type_name(top.annotation)}" if top is not None else ""
    return f"handlers.settings.{app_id}.{location}: {error['msg']} (given {error['input']!r}{expected})"


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def _setting_infos(app_class: type[App], given: Mapping[str, Any]) -> list[dict[str, Any]]:
    model = app_class.settings_model
    if model is None:
        return []
    infos = []
    for name, info in model.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        value = given.get(name, given.get(info.alias, default) if info.alias else default)
        infos.append(
            {
                "name": name,
                "type": _type_name(info.annotation),
                "required": info.is_required(),
                "default": default,
                "description": info.description,
                "value": value,
            }
        )
    return infos


def _as_json(info: PluginInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "distribution": info.distribution,
        "version": info.version,
        "entry_point": info.entry_point,
        "enabled": info.enabled,
        "position": info.position,
        "settings": info.settings,
        "problem": info.problem,
    }


def _as_text(infos: Sequence[PluginInfo]) -> str:
    lines = []
    for info in infos:
        origin = f"{info.distribution} {info.version}, {info.entry_point}" if info.distribution else "not installed"
        state = f"enabled, runs {info.position} of {sum(i.enabled for i in infos)}" if info.enabled else "not enabled"
        lines.append(f"{info.id}  ({origin})  {state}")
        if not info.settings:
            lines.append("  settings: none")
        for s in info.settings:
            default = "required" if s["required"] else f"default {s['default']!r}"
            configured = f", configured {s['value']!r}" if s["value"] != s["default"] else ""
            about = f"  # {s['description']}" if s["description"] else ""
            lines.append(f"  {s['name']}: {s['type']} ({default}{configured}){about}")
        if info.problem:
            lines.extend("  problem: " + line if n == 0 else "    " + line for n, line in enumerate(info.problem.splitlines()))
    if not infos:
        lines.append(f"no handler plugins installed (entry-point group {constants.HANDLER_ENTRY_POINT_GROUP})")
    return "\n".join(lines) + "\n"
