"""Rewrite the generated configuration reference: the tables in README.md and the whole of
docs/configuration.md, from the settings classes.

    .venv/bin/python scripts/update_docs.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from config_reference import configuration_md, reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
SECTION = re.compile(
    r"(<!-- config-reference:start[^>]*-->\n)(.*?)(<!-- config-reference:end -->)", re.S
)


def updated(text: str) -> str:
    return SECTION.sub(lambda m: m.group(1) + reference() + m.group(3), text, count=1)


if __name__ == "__main__":
    README.write_text(updated(README.read_text()))
    CONFIGURATION.parent.mkdir(exist_ok=True)
    CONFIGURATION.write_text(configuration_md())
