"""Fixtures of the fault-injection suite (``pytest -m faults``): a cluster of the real programs
whose agents keep their command cgroups under a per-test root, and the figures the tests
measure, printed at the end of the run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.faults.harness import FIGURES, FaultCluster, open_fault_cluster


@pytest.fixture
async def cluster(tmp_path: Path, db_url: str) -> AsyncIterator[FaultCluster]:
    with trio.fail_after(300):
        async with open_fault_cluster(tmp_path, db_url) as running:
            yield running


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    terminalreporter.section("fault-injection figures (measured, not asserted)")
    for figure in FIGURES:
        terminalreporter.write_line(
            f"{figure.test}: {figure.name} = {figure.value:g} {figure.unit}"
        )
