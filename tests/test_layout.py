"""The daemon's layout is a map: one folder a subsystem, imports one way (``daemon/__init__.py``).

The import contracts live in ``pyproject.toml`` (import-linter); this runs them, so a change that
makes the store import the engine, or the engine import the agent port, fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parent.parent
SUBSYSTEMS = ("api", "agents", "engine", "store", "ops")


def test_import_contracts_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # lint-imports reads pyproject.toml from the working directory
    assert lint_imports(no_cache=True) == 0, (
        "an import contract in pyproject.toml is broken (above)"
    )


def test_at_most_a_dozen_modules_beside_the_subsystems() -> None:
    loose = sorted(p.name for p in (ROOT / "daemon").glob("*.py"))
    assert len(loose) <= 12, loose


@pytest.mark.parametrize("subsystem", SUBSYSTEMS)
def test_each_subsystem_says_what_it_owns_and_may_import(subsystem: str) -> None:
    init = ROOT / "daemon" / subsystem / "__init__.py"
    docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert "Owns" in docstring and "May import" in docstring, init
