"""The README's configuration reference is generated from the settings and must not drift."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from update_docs import README, updated  # noqa: E402


def test_readme_configuration_reference_matches_the_settings() -> None:
    text = README.read_text()
    assert updated(text) == text, "run: .venv/bin/python scripts/update_docs.py"


def test_readme_names_every_option() -> None:
    text = README.read_text()
    for option in ("--agent-grace-s", "--max-running-executions", "--state-dir", "--label"):
        assert f"`{option}`" in text
