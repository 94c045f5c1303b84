"""`rc-worker new-handler`: the package it writes installs with pip, passes its own tests, and runs.

The slow part installs one generated package into this environment once (a module fixture),
and uninstalls it at the end; everything else renders into a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support import TopicSet, WorkerProcess, load_events, rc_worker, store_for, wait_until
from worker.errors import ConfigError
from worker.testing import cloud_event, message
from worker.tools.scaffold import Names, render

EXPECTED_FILES = ["README.md", "pyproject.toml", "src/{module}/__init__.py", "src/{module}/handler.py", "tests/test_handler.py"]


class TestNames:
    def test_names_are_derived_from_the_app_id(self) -> None:
        """Distribution, module and class names follow from the app id."""
        assert Names.from_app_id("link-counter") == Names(
            "link-counter", "rc-handler-link-counter", "rc_handler_link_counter", "LinkCounter"
        )

    @pytest.mark.parametrize("name", ["LinkCounter", "link_counter", "-x", "x-", "a--b", "1st", "", "a" * 65])
    def test_a_name_that_is_not_an_app_id_is_refused(self, name: str) -> None:
        """Only lower-case words joined by dashes, as the built-in ids are."""
        with pytest.raises(ConfigError, match="lower-case words joined by dashes"):
            Names.from_app_id(name)


class TestRender:
    def test_the_package_has_its_entry_point_handler_and_tests(self, tmp_path: Path) -> None:
        """Every template is rendered, with nothing left unsubstituted, and the entry point names the class."""
        names = Names.from_app_id("link-counter")
        files = render(names, tmp_path / "pkg")
        assert [str(f) for f in files] == sorted(f.format(module=names.module) for f in EXPECTED_FILES)
        for path in files:
            assert "${" not in (tmp_path / "pkg" / path).read_text()
        project = tomllib.loads((tmp_path / "pkg" / "pyproject.toml").read_text())
        assert project["project"]["entry-points"]["rc_worker.handlers"] == {"link-counter": "rc_handler_link_counter.handler:LinkCounter"}
        assert project["project"]["name"] == "rc-handler-link-counter"
        compile((tmp_path / "pkg" / "src" / names.module / "handler.py").read_text(), "handler.py", "exec")

    def test_a_directory_with_files_is_not_overwritten(self, tmp_path: Path) -> None:
        """Rendering into a non-empty directory is refused, and nothing is written."""
        (tmp_path / "keep.txt").write_text("mine")
        with pytest.raises(ConfigError, match="already exists and is not an empty directory"):
            render(Names.from_app_id("x"), tmp_path)
        assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]

    def test_the_command_writes_into_a_directory_named_after_the_app(self, tmp_path: Path) -> None:
        """Without --dir, ./NAME; the output lists the files and the next steps."""
        result = subprocess.run(
            [sys.executable, "-m", "worker", "new-handler", "word-count"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert (tmp_path / "word-count" / "src" / "rc_handler_word_count" / "handler.py").exists()
        assert "pip install -e" in result.stdout
        assert "RC_WORKER_HANDLERS__ENABLED" in result.stdout

    def test_the_command_refuses_an_id_that_is_already_installed(self, tmp_path: Path) -> None:
        """A second message-count would make two plugins claim one id: exit 2, nothing written."""
        result = rc_worker("new-handler", "message-count", "--dir", str(tmp_path / "mc"), env=os.environ, check=False)
        assert result.returncode == 2
        assert "already has the app id 'message-count'" in result.stderr
        assert not (tmp_path / "mc").exists()


class Plugin(NamedTuple):
    """A generated, installed plugin package."""

    names: Names
    directory: Path


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plugin]:
    """A generated package, pip-installed (editable) into this environment for the module, then uninstalled."""
    names = Names.from_app_id(f"scaffold-probe-{uuid.uuid4().hex[:6]}")
    directory = tmp_path_factory.mktemp("scaffold") / names.app_id
    render(names, directory)
    # No build isolation: setuptools is already here, and the test needs no network.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-build-isolation", "-e", str(directory)], check=True, timeout=300, capture_output=True)
    try:
        yield Plugin(names, directory)
    finally:
        subprocess.run([*pip, "uninstall", "-y", names.distribution], check=False, timeout=300, capture_output=True)


@pytest.mark.slow
class TestInstalledPackage:
    def test_its_generated_tests_pass_unchanged(self, installed_plugin: Plugin) -> None:
        """pytest in the package directory, as its author would run it, passes as generated."""
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            cwd=installed_plugin.directory,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert "5 passed" in result.stdout

    def test_rc_worker_handlers_lists_it_with_its_settings(self, installed_plugin: Plugin) -> None:
        """The entry point is discovered: id, distribution, version, the min_length setting; enabled when listed."""
        names = installed_plugin.names
        env = {**os.environ, "RC_WORKER_HANDLERS__ENABLED": json.dumps(["message-count", names.app_id])}
        listed = {item["id"]: item for item in json.loads(rc_worker("handlers", "--json", env=env).stdout)}
        plugin = listed[names.app_id]
        assert (plugin["distribution"], plugin["version"], plugin["enabled"], plugin["problem"]) == (
            names.distribution,
            "0.1.0",
            True,
            None,
        )
        assert [(s["name"], s["default"]) for s in plugin["settings"]] == [("min_length", 1)]

    @pytest.mark.kafka
    async def test_rc_worker_run_discovers_and_runs_it(
        self, installed_plugin: Plugin, topics: TopicSet, sqlite_url: str, tmp_path: Path
    ) -> None:
        """Installed and enabled through RC_WORKER_HANDLERS__ENABLED, it runs against the real broker: its records appear."""
        app_id = installed_plugin.names.app_id
        env = topics.env(sqlite_url, RC_WORKER_HANDLERS__ENABLED=json.dumps(["message-count", app_id]))
        events = [
            cloud_event(message(text, sender=sender, room=room))
            for text, sender, room in [("hi", "ann", "r1"), ("yo", "ann", "r2"), ("hey", "ben", "r1"), ("", "ben", "r2")]
        ]
        load_events(events, tmp_path / "events.jsonl", env)
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:

            async def counts() -> dict[str, int]:
                async with store_for(sqlite_url) as store:
                    # The count first: once every event is processed, the records read after it are final.
                    done = await store.processed_count(app_id)
                    found = {r.associations[0]: json.loads(r.data)["count"] for r in await store.app_records(app_id)}
                return found if done == len(events) else {}

            found = await wait_until(counts, timeout=120, what=f"{app_id} to process every event")
        finally:
            assert worker.terminate() == 0
        assert found == {"user:id-ann": 2, "user:id-ben": 1}  # ben's empty message is below min_length
