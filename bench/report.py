"""docs/benchmarks.md from the measurements: machine, command, a table per scenario (median and
min-max spread of the rounds), the targets met or missed, and an SVG plot of fan-out time against
hosts. Text between ``<!-- notes:start -->`` and ``<!-- notes:end -->`` in an existing report
(the analysis written by people) is kept."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

Results = dict[str, dict[str, list[dict[str, float]]]]

UNITS = {
    "elapsed_s": "s", "cpu_ms_per_host_job": "ms CPU/host-job", "agent_rss_mib": "MiB agent RSS",
    "agent_cpu_ms_per_host_job": "ms agent CPU/host-job",
    "connect_s": "s to connect all", "rss_empty_mib": "MiB RSS empty",
    "rss_idle_mib": "MiB RSS idle", "kib_per_agent": "KiB RSS/agent",
    "rss_peak_mib": "MiB RSS after", "elapsed_probed_s": "s with the API probed",
    "api_p50_ms": "ms API p50", "api_p99_ms": "ms API p99",
    "api_calls": "API calls", "idle_cpu_percent": "% CPU idle", "mb_per_s": "MB/s",
    "frames_per_s": "frames/s", "lag_p50_s": "s lag p50", "lag_p99_s": "s lag p99",
    "all_back_s": "s until all back", "never_back": "never back", "refusals": "refused",
    "hosts": "hosts",
}  # fmt: skip


def _cell(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    median = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return f"{median:.3g}"
    return f"{median:.3g} ({min(values):.3g}–{max(values):.3g})"


def _table(rows: dict[str, list[dict[str, float]]]) -> str:
    keys: list[str] = []
    for runs in rows.values():
        for run in runs:
            keys += [k for k in run if k not in keys and k != "hosts"]
    head = "| | " + " | ".join(UNITS.get(k, k) for k in keys) + " |"
    lines = [head, "|---" * (len(keys) + 1) + "|"]
    for label, runs in rows.items():
        cells = [_cell([r[k] for r in runs if k in r]) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _median(results: Results, scenario: str, label: str, key: str) -> float | None:
    runs = results.get(scenario, {}).get(label)
    values = [r[key] for r in runs or [] if key in r and not math.isnan(r[key])]
    return statistics.median(values) if values else None


# (what, (scenario, configuration, metric), comparison, goal, unit); "ratio" compares the
# daemon's CPU per host-job with the bare skeleton's.
TARGETS = [
    ("100 real agents, `echo hi`, last result durable", ("fanout-real", "100 agents", "elapsed_s"),
     "<=", 0.3, "s"),
    ("10,000 simulated agents, every result durable", ("fanout-sim", "10000 agents", "elapsed_s"),
     "<=", 5, "s"),
    ("daemon CPU per host-job vs the bare skeleton (10k)", ("ratio", "10000 agents", ""), "<=", 2,
     "×"),
    ("daemon RSS per connected agent (10k)", ("fanout-sim", "10000 agents", "kib_per_agent"), "<=",
     50, "KiB"),
    ("agent process RSS", ("fanout-real", "100 agents", "agent_rss_mib"), "<=", 40, "MiB"),
    ("stdout ingested (1k agents, 16 KiB chunks)",
     ("ingest", "1000 agents x 16 KiB chunks", "mb_per_s"), ">=", 50, "MB/s"),
    ("ingest lag p99, sent to durable, at 51 MB/s sustained",
     ("ingest", "1000 agents x 16 KiB chunks paced, 51 MB/s", "lag_p99_s"), "<=", 1, "s"),
    ("progress API p99 during the 10k fan-out", ("fanout-sim", "10000 agents", "api_p99_ms"), "<",
     100, "ms"),
    ("10,000 agents reconnecting: all back", ("storm", "10000 agents", "all_back_s"), "<=", 30,
     "s"),
    ("10,000 idle agents: daemon CPU", ("fanout-sim", "10000 agents", "idle_cpu_percent"), "<", 5,
     "%"),
]  # fmt: skip
_COMPARE = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}


def _measured(results: Results, scenario: str, label: str, key: str) -> float | None:
    if scenario == "ratio":
        product = _median(results, "fanout-sim", label, "cpu_ms_per_host_job")
        floor = _median(results, "skeleton", label, "cpu_ms_per_host_job")
        return product / floor if product and floor else None
    return _median(results, scenario, label, key)


def _targets(results: Results) -> str:
    lines = ["| target | measured (median) | goal | |", "|---|---|---|---|"]
    for what, (scenario, label, key), op, goal, unit in TARGETS:
        value = _measured(results, scenario, label, key)
        shown_goal = f"{op.replace('<=', '≤').replace('>=', '≥')} {goal:g} {unit}"
        if value is None:
            lines.append(f"| {what} | not measured in this run | {shown_goal} | |")
        else:
            verdict = "met" if _COMPARE[op](value, goal) else "MISSED"
            lines.append(f"| {what} | {value:.3g} {unit} | {shown_goal} | {verdict} |")
    return "\n".join(lines)


def _plot(results: Results) -> str | None:
    series = []
    for scenario, colour in (("fanout-real", "#d62728"), ("fanout-sim", "#1f77b4"),
                             ("skeleton", "#2ca02c")):  # fmt: skip
        points = []
        for label, runs in results.get(scenario, {}).items():
            hosts = runs[0].get("hosts") or float(re.match(r"\d+", label).group())  # type: ignore[union-attr]
            values = [r["elapsed_s"] for r in runs if "elapsed_s" in r]
            if values:
                points.append((hosts, statistics.median(values)))
        if points:
            series.append((scenario, colour, sorted(points)))
    if not series:
        return None
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts]
    width, height, pad = 640, 360, 56
    x_min, x_max = math.log10(min(xs)), math.log10(max(xs) * 1.2)
    y_max = max(ys) * 1.15

    def px(x: float) -> float:
        return pad + (math.log10(x) - x_min) / max(x_max - x_min, 1e-9) * (width - 2 * pad)

    def py(y: float) -> float:
        return height - pad - y / y_max * (height - 2 * pad)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
             f'stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 14}" text-anchor="middle">'
             f'hosts (log scale)</text>',
             f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" '
             f'text-anchor="middle">start call to last result durable (s)</text>']  # fmt: skip
    for tick in sorted(set(xs)):
        parts.append(
            f'<text x="{px(tick):.0f}" y="{height - pad + 16}" text-anchor="middle">{tick:g}</text>'
        )
    for i in range(5):
        value = y_max * i / 4
        parts.append(
            f'<text x="{pad - 6}" y="{py(value) + 4:.0f}" text-anchor="end">{value:.2g}</text>'
        )
    for index, (name, colour, points) in enumerate(series):
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [
            f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>' for x, y in points
        ]
        parts.append(
            f'<text x="{width - pad - 120}" y="{pad + 16 * index}" fill="{colour}">{name}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


NOTES_EMPTY = (
    "<!-- notes:start -->\n(analysis: what the profile shows, what was changed)\n<!-- notes:end -->"
)


def write(out: Path, results: Results, *, command: str, rounds: int, wall_s: float,
          machine: dict[str, str]) -> None:  # fmt: skip
    notes = NOTES_EMPTY
    if out.exists():
        found = re.search(r"<!-- notes:start -->.*?<!-- notes:end -->", out.read_text(), re.S)
        if found:
            notes = found.group(0)
    lines = [
        "# Benchmarks", "",
        f"Command: `{command}` ({rounds} round{'s' if rounds != 1 else ''} per configuration, "
        f"{wall_s / 60:.0f} min in all). Each cell: median (min–max) of the rounds.", "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), "",
        "## Targets", "", _targets(results), "",
    ]  # fmt: skip
    plot = _plot(results)
    if plot is not None:
        svg = out.with_name("benchmarks-fanout.svg")
        svg.write_text(plot)
        lines += [f"![fan-out time against hosts]({svg.name})", ""]
    for scenario, rows in results.items():
        lines += [f"## {scenario}", "", _table(rows), ""]
    lines += ["## Analysis", "", notes, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
