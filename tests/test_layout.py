"""The house's size rules (issue 13), held in CI: short modules, short functions.

A module past 450 lines or a function past 60 is where a room stops being findable; the
CLI's parser, one table of every command and flag, is the one function allowed to be long.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("worker", "handlers")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
LONG_ON_PURPOSE = {("worker/cli.py", "_parser")}


def _modules() -> list[Path]:
    found = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    assert len(found) > 50, f"found only {len(found)} modules: is ROOT ({ROOT}) the project?"
    return found


def test_no_module_is_over_450_lines() -> None:
    """Every module of the runtime and the built-in handlers fits in 450 lines."""
    long = {str(path.relative_to(ROOT)): n for path in _modules() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_over_60_lines_but_the_cli_parser() -> None:
    """Every function, docstring included, fits in 60 lines; the CLI's argument table is the exception."""
    long = {}
    for path in _modules():
        name = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (name, node.name) not in LONG_ON_PURPOSE:
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{name}:{node.lineno} {node.name}"] = lines
    assert long == {}
