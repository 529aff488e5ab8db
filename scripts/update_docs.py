"""Rewrite the configuration reference in README.md from the settings dataclasses.

    .venv/bin/python scripts/update_docs.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from config_reference import reference  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = re.compile(
    r"(<!-- config-reference:start[^>]*-->\n)(.*?)(<!-- config-reference:end -->)", re.S
)


def updated(text: str) -> str:
    return SECTION.sub(lambda m: m.group(1) + reference() + m.group(3), text, count=1)


if __name__ == "__main__":
    README.write_text(updated(README.read_text()))
