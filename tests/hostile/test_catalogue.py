"""The catalogue, counted: at least 30 distinct hostile inputs across the HTTP API and the agent
stream, each a named case of one of this suite's modules (which register them on import)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import tests.hostile
from tests.hostile.catalogue import CATALOGUE

pytestmark = pytest.mark.hostile


def test_the_catalogue_holds_at_least_thirty_distinct_cases() -> None:
    for module in pkgutil.iter_modules(tests.hostile.__path__):
        if module.name.startswith("test_"):
            importlib.import_module(f"tests.hostile.{module.name}")
    cases = list(CATALOGUE.values())
    http = [c for c in cases if c.surface == "http"]
    stream = [c for c in cases if c.surface == "stream"]
    answered = [c for c in cases if c.bug is None]
    assert len({c.name for c in cases}) == len(cases)
    assert len({(c.surface, c.given) for c in cases}) == len(cases)  # no input twice
    assert len(answered) >= 30, len(answered)
    assert len(http) >= 30 and len(stream) >= 15, (len(http), len(stream))
    for found in cases:
        assert found.given and found.answer, found
