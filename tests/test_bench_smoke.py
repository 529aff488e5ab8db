"""The benchmark command works: ``python -m bench --quick`` runs every scenario once, small, with
the real programs, and writes a report with a row of numbers per scenario. It says nothing about
speed (that is what the full run and docs/benchmarks.md are for); it fails when a scenario breaks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as bench_main

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.e2e


def test_quick_benchmark_runs_every_scenario_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    finished = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-4000:]
    report = out.read_text()
    assert "Command: `python -m bench --quick --out" in report
    for scenario, rows in bench_main.QUICK.items():
        assert f"## {scenario}" in report
        for label, _ in rows:
            row = next(line for line in report.splitlines() if line.startswith(f"| {label} |"))
            cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
            # every measurement of a working round is a number; "-" would mean none was taken
            assert cells and all(re.fullmatch(r"[0-9.e+-]+( \(.*\))?", c) for c in cells), row
    assert (tmp_path / "benchmarks-fanout.svg").read_text().startswith("<svg")
    # the quick run is a smoke test: its targets table says what was not measured at full size
    assert "not measured in this run" in report
