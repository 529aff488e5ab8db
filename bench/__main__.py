"""``python -m bench``: run the benchmark scenarios and write docs/benchmarks.md.

    python -m bench                      # everything, 5 rounds each (about 80 min on 2 cores)
    python -m bench fanout-real skeleton # some scenarios
    python -m bench --quick              # a small smoke of every scenario (CI): 1 round, small N,
                                         # written to a temporary file unless --out is given

Each round starts fresh processes (a daemon on a new SQLite file, agents or simulated agents) and
stops them. Reported: the median of the rounds and their spread (min-max).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import report, scenarios

FULL: dict[str, list[tuple[str, Callable[[], scenarios.Result]]]] = {
    "fanout-real": [(f"{n} agents", lambda n=n: scenarios.fanout_real(n)) for n in (10, 50, 100)],
    "fanout-sim": [
        (f"{n} agents", lambda n=n: scenarios.fanout_sim(n, idle_cpu_s=60 if n == 10000 else 0))
        for n in (1000, 5000, 10000)
    ],
    "skeleton": [(f"{n} agents", lambda n=n: scenarios.skeleton(n)) for n in (1000, 5000, 10000)],
    "ingest": [
        ("1000 agents x 100 B chunks", lambda: scenarios.ingest(1000, 100, 20_000)),
        ("1000 agents x 16 KiB chunks", lambda: scenarios.ingest(1000, 16384, 512 * 1024)),
        # 50 KiB/s each: 51 MB/s in all, sustained for 10 s
        (
            "1000 agents x 16 KiB chunks paced, 51 MB/s",
            lambda: scenarios.ingest(1000, 16384, 512 * 1024, rate_bps=50 * 1024),
        ),
    ],
    "storm": [(f"{n} agents", lambda n=n: scenarios.storm(n)) for n in (2000, 10000)],
}
QUICK: dict[str, list[tuple[str, Callable[[], scenarios.Result]]]] = {
    "fanout-real": [("3 agents", lambda: scenarios.fanout_real(3))],
    "fanout-sim": [("50 agents", lambda: scenarios.fanout_sim(50, idle_cpu_s=2))],
    "skeleton": [("50 agents", lambda: scenarios.skeleton(50))],
    "ingest": [
        ("20 agents x 100 B chunks", lambda: scenarios.ingest(20, 100, 2000)),
        ("20 agents x 1 KiB chunks paced", lambda: scenarios.ingest(20, 1024, 8192, 8192)),
    ],
    "storm": [("50 agents", lambda: scenarios.storm(50))],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", choices=[[], *FULL], default=[],
                        help=f"which to run (default: all): {', '.join(FULL)}")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 round, small N (a smoke test)")
    parser.add_argument(
        "--out", type=Path, help="default: docs/benchmarks.md (a temp file with --quick)"
    )
    args = parser.parse_args(argv)
    table = QUICK if args.quick else FULL
    rounds = 1 if args.quick else args.rounds
    chosen = args.scenarios or list(table)
    if args.out:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp()) / "benchmarks.md"
    else:
        out = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
    results: dict[str, dict[str, list[scenarios.Result]]] = {}
    began = time.monotonic()
    for name in chosen:
        results[name] = {}
        for label, run in table[name]:
            runs = []
            for index in range(rounds):
                print(
                    f"{name} / {label}: round {index + 1} of {rounds}", file=sys.stderr, flush=True
                )
                runs.append(run())
            results[name][label] = runs
            print(f"  {summary_line(runs)}", file=sys.stderr, flush=True)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    report.write(out, results, command=command.strip(), rounds=rounds,
                 wall_s=time.monotonic() - began, machine=scenarios.machine())  # fmt: skip
    print(f"wrote {out}", file=sys.stderr)
    return 0


def summary_line(runs: list[scenarios.Result]) -> str:
    keys = runs[0].keys()
    parts = []
    for key in keys:
        values = [r[key] for r in runs if key in r and not math.isnan(r[key])]
        if values:
            parts.append(f"{key}={statistics.median(values):.4g}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
