"""``rc-worker new-handler NAME [--dir DIR]``: a new handler plugin package, ready to install and test.

The package is rendered from ``worker/templates/handler``: a pyproject registering the app
under the entry-point group ``rc_worker.handlers``, a handler module (an App subclass with a
settings model), tests using ``worker.testing``, and a README. It installs with pip and its
tests pass as generated, so an author starts from something that works.
"""

from __future__ import annotations

import argparse
import re
import string
from dataclasses import dataclass
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from importlib.resources.abc import Traversable
from pathlib import Path

from worker.errors import ConfigError

#: App ids as the built-in ones are spelled: lower-case words joined by dashes.
APP_ID = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
TEMPLATE_SUFFIX = ".tmpl"
MODULE_PLACEHOLDER = "__module__"


@dataclass(frozen=True, slots=True)
class Names:
    """Every name a new plugin needs, derived from its app id."""

    app_id: str
    distribution: str
    module: str
    class_name: str

    @classmethod
    def from_app_id(cls, app_id: str) -> Names:
        """``link-counter`` -> rc-handler-link-counter, rc_handler_link_counter, LinkCounter.

        Raises:
            ConfigError: ``app_id`` is not lower-case words joined by dashes.

        """
        if not APP_ID.fullmatch(app_id) or len(app_id) > 64:
            raise ConfigError(
                f"handler name {app_id!r} must be lower-case words joined by dashes, at most 64 characters, "
                "e.g. link-counter; it becomes the app id"
            )
        words = app_id.split("-")
        # The prefix keeps the module from shadowing another top-level module (json, http...).
        return cls(app_id, f"rc-handler-{app_id}", "rc_handler_" + "_".join(words), "".join(w.capitalize() for w in words))


def render(names: Names, directory: Path) -> list[Path]:
    """Write the plugin package for ``names`` into ``directory``; returns the files, relative to it.

    Raises:
        ConfigError: ``directory`` exists and is not empty, or is a file.

    """
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ConfigError(f"{directory} already exists and is not an empty directory; pass --dir with a new path")
    values = {
        "app_id": names.app_id,
        "distribution": names.distribution,
        "module": names.module,
        "class_name": names.class_name,
        "worker_version": _worker_version(),
    }
    written = []
    for relative, template in _templates(resources.files("worker") / "templates" / "handler", Path()):
        target = directory / Path(*(names.module if part == MODULE_PLACEHOLDER else part for part in relative.parts))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(string.Template(template.read_text(encoding="utf-8")).substitute(values), encoding="utf-8")
        written.append(target.relative_to(directory))
    return sorted(written)


async def new_handler_command(_settings: object, args: argparse.Namespace) -> int:
    """``rc-worker new-handler NAME [--dir DIR]``: render the package and say what to do next."""
    from worker.plugins import installed

    names = Names.from_app_id(args.name)
    if names.app_id in installed():
        raise ConfigError(f"an installed plugin already has the app id {names.app_id!r} (see rc-worker handlers); choose another name")
    directory = Path(args.dir) if args.dir else Path.cwd() / names.app_id
    files = render(names, directory)
    print(f"created {names.distribution} (app id {names.app_id}) in {directory}:")
    for path in files:
        print(f"  {path}")
    print(
        "next:\n"
        f"  pip install -e '{directory}[test]'   # registers the entry point {names.app_id}\n"
        f"  pytest {directory}                  # its tests pass as generated\n"
        f'  RC_WORKER_HANDLERS__ENABLED=\'["message-count", "{names.app_id}"]\' rc-worker run'
    )
    return 0


def _templates(folder: Traversable, relative: Path) -> list[tuple[Path, Traversable]]:
    found = []
    for entry in folder.iterdir():
        if entry.is_dir():
            found += _templates(entry, relative / entry.name)
        elif entry.name.endswith(TEMPLATE_SUFFIX):
            found.append((relative / entry.name.removesuffix(TEMPLATE_SUFFIX), entry))
    return found


def _worker_version() -> str:
    try:
        major, minor, *_ = version("rc-apps-worker").split(".")
    except (PackageNotFoundError, ValueError):
        return "0.1"
    return f"{major}.{minor}"
