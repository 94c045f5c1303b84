"""The handler guide's samples: every Python block runs, every shell block is run or says why not."""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.support import ROOT
from worker.config import Settings
from worker.plugins import load_apps

GUIDE = ROOT / "docs" / "writing-a-handler.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*(?P<kind>run|not run)(?::\s*(?P<reason>.*?))?\s*-->\s*\Z", re.DOTALL)
KNOWN = {"python", "sh", "yaml", "toml", "json", "text"}


@dataclass(frozen=True)
class Block:
    """One fenced block of the guide, with the marker comment right above it (if any)."""

    lang: str
    body: str
    line: int
    marker: str | None
    reason: str | None


def blocks(path: Path) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip()
        marker = MARKER.search(before[-2000:])
        found.append(
            Block(
                match["lang"],
                match["body"],
                text.count("\n", 0, match.start()) + 1,
                marker["kind"] if marker else None,
                (marker["reason"] or "").strip() if marker else None,
            )
        )
    return found


GUIDE_BLOCKS = blocks(GUIDE)


def _of(lang: str) -> list[Block]:
    return [b for b in GUIDE_BLOCKS if b.lang == lang]


class TestGuideShape:
    def test_every_block_names_a_known_language(self) -> None:
        """Each fenced block says what it is, so the checks below know what to do with it."""
        unknown = [(b.line, b.lang) for b in GUIDE_BLOCKS if b.lang not in KNOWN]
        assert not unknown, f"blocks with an unknown or missing language (line, lang): {unknown}"
        assert len(_of("python")) >= 8

    def test_every_shell_block_is_run_or_says_why_not(self) -> None:
        """A shell block carries <!-- run --> or <!-- not run: reason --> right above it."""
        unmarked = [b.line for b in _of("sh") if b.marker is None]
        unreasoned = [b.line for b in _of("sh") if b.marker == "not run" and not b.reason]
        assert not unmarked, f"shell blocks without a run / not-run marker at lines {unmarked}"
        assert not unreasoned, f"shell blocks marked not run without a reason at lines {unreasoned}"


class TestGuideSamples:
    def test_python_blocks_run_in_order(self) -> None:
        """Every Python block runs, top-level await included, in one namespace as one reading session."""
        namespace: dict[str, object] = {"__name__": "writing_a_handler"}
        with asyncio.Runner() as runner:
            for block in _of("python"):
                code = compile(block.body, f"{GUIDE.name}:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                try:
                    result = eval(code, namespace)  # noqa: S307 - our own documentation's code
                    if inspect.iscoroutine(result):
                        runner.run(result)
                except Exception as exc:
                    raise AssertionError(f"the Python block at {GUIDE.name}:{block.line} failed: {type(exc).__name__}: {exc}") from exc

    def test_shell_blocks_marked_run_succeed(self, tmp_path: Path) -> None:
        """Each shell block marked run exits 0, run by bash in a scratch directory."""
        marked = [b for b in _of("sh") if b.marker == "run"]
        assert marked
        env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RC_WORKER_CONFIG", None)
        for block in marked:
            result = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", block.body],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, f"the shell block at line {block.line} exited {result.returncode}:\n{result.stderr[-2000:]}"

    def test_yaml_blocks_are_valid_configuration(self) -> None:
        """Each YAML block is valid config.yaml content, its handler settings included."""
        for block in _of("yaml"):
            document = yaml.safe_load(block.body)
            settings = Settings(**document)
            load_apps(settings.handlers.enabled, settings.handlers.settings)

    def test_toml_and_json_blocks_parse(self) -> None:
        """Each TOML and JSON block is syntactically valid."""
        for block in _of("toml"):
            tomllib.loads(block.body)
        for block in _of("json"):
            json.loads(block.body)


@pytest.mark.parametrize("path", sorted((ROOT / "worker" / "templates" / "handler").rglob("README.md.tmpl")))
def test_scaffold_readme_commands_exist(path: Path) -> None:
    """The generated README only names rc-worker commands that exist."""
    from worker.cli import COMMANDS

    names = {command for command, _ in COMMANDS}
    used = set(re.findall(r"rc-worker ([a-z-]+)", path.read_text()))
    assert used <= names, f"unknown commands in {path.name}: {used - names}"
