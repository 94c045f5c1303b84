"""worker's public API for handler authors: small, sorted, importable, and all the handlers use."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import worker
from tests.support import ROOT
from worker.tools.scaffold import Names, render

REQUIRED = {
    "App",
    "Association",
    "AssociationModel",
    "Message",
    "Room",
    "User",
    "IRead",
    "IPersistenceRead",
    "IPersistence",
    "IHttp",
    "IModify",
}
PROTOCOLS = {
    "IRead",
    "IPersistenceRead",
    "IPersistence",
    "IHttp",
    "IModify",
    "IUserRead",
    "IRoomRead",
    "IMessageRead",
    "INotifier",
    "IModifyDeleter",
}


class TestAll:
    def test_all_is_sorted_and_without_repeats(self) -> None:
        """__all__ reads as an index: sorted, each name once."""
        assert worker.__all__ == sorted(set(worker.__all__))

    def test_all_is_small(self) -> None:
        """A handful of names to learn: the contract, one Protocol per Apps-Engine accessor, no more than twenty-five."""
        assert len(worker.__all__) <= 25

    def test_every_name_is_importable_from_worker(self) -> None:
        """`from worker import X` works for every X in __all__, in a fresh import too."""
        fresh = importlib.reload(worker)
        missing = [name for name in fresh.__all__ if not hasattr(fresh, name)]
        assert missing == []

    def test_the_contract_names_are_exported(self) -> None:
        """App, associations, the message types and the accessor Protocols."""
        assert set(worker.__all__) >= REQUIRED

    def test_the_accessors_are_protocols(self) -> None:
        """Handlers depend on structural types, not on the worker's implementations."""
        for name in PROTOCOLS:
            assert getattr(getattr(worker, name), "_is_protocol", False), f"{name} is not a Protocol"

    def test_every_exported_name_is_documented(self) -> None:
        """Each exported class has a docstring."""
        assert [name for name in worker.__all__ if not (getattr(worker, name).__doc__ or "").strip()] == []


def _worker_imports(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "worker":
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names if alias.name.split(".")[0] == "worker")
    return modules


class TestHandlersUseThePublicApi:
    def test_built_in_handlers_import_only_worker_itself(self) -> None:
        """handlers/ are plugins like any other: `from worker import ...`, never worker's modules."""
        used = {path.name: _worker_imports(path.read_text()) for path in sorted((ROOT / "handlers").glob("*.py"))}
        assert {name: modules for name, modules in used.items() if modules - {"worker"}} == {}

    def test_the_scaffold_handler_imports_only_worker_itself(self, tmp_path: Path) -> None:
        """The generated plugin starts out on the public API too (its tests use worker.testing)."""
        names = Names.from_app_id("probe")
        render(names, tmp_path / "probe")
        assert _worker_imports((tmp_path / "probe" / "src" / names.module / "handler.py").read_text()) == {"worker"}
        assert _worker_imports((tmp_path / "probe" / "tests" / "test_handler.py").read_text()) == {"worker", "worker.testing"}
