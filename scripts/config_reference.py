"""The configuration reference of dispatchd, dispatch-agent and dispatchctl, from the settings
classes themselves: the README's tables (``reference()``) and ``docs/configuration.md``
(``configuration_md()``: every option with its TOML key, environment variable, default and unit,
and a sample TOML file per program). ``scripts/update_docs.py`` writes both; ``tests/test_docs.py``
checks they match the code.

    python scripts/config_reference.py            # the README tables
    python scripts/config_reference.py --full     # docs/configuration.md
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import AgentConfig  # noqa: E402
from common.settings import Option, Settings, options  # noqa: E402
from daemon.config import DaemonConfig  # noqa: E402
from dispatchctl.config import CtlConfig  # noqa: E402

# (title, settings class, where its TOML file usually is)
PROGRAMS: tuple[tuple[str, type[Settings], str], ...] = (
    ("dispatchd", DaemonConfig, "/etc/dispatch/dispatchd.toml"),
    ("dispatch-agent", AgentConfig, "/etc/dispatch/dispatch-agent.toml"),
    ("dispatchctl", CtlConfig, "~/.config/dispatchctl.toml"),
)

# Units, by the end of an option's name (units are in the names: DESIGN.md §6.8) ...
SUFFIX_UNITS = (
    ("_bytes_per_s", "bytes per second"),
    ("_messages_per_s", "messages per second"),
    ("_heartbeats_per_s", "heartbeats per second"),
    ("_per_s", "per second"),
    ("_ms", "milliseconds"),
    ("_s", "seconds"),
    ("_bytes", "bytes"),
    ("_days", "days"),
)
# ... and what the whole numbers without a unit suffix count.
COUNT_UNITS = {
    "max_running_executions": "executions",
    "max_running_tasks": "tasks",
    "grpc_backlog": "connections",
    "writer_batch_events": "changes",
    "writer_queue_items": "changes",
    "db_read_threads": "threads",
    "max_targets_per_task": "hosts",
    "sse_buffer_events": "events",
    "retention_batch_tasks": "tasks",
    "max_parallel": "commands",
    "event_batch_max_events": "events",
    "remembered_ids": "ids",
}


REQUIRED = object()


def default_of(option: Option) -> Any:
    """The default, ``None`` when there is none, or ``REQUIRED``."""
    if option.required:
        return REQUIRED
    if option.field.default_factory is not None:
        made = option.default()
        return made if isinstance(made, dict | list | tuple) else "(see meaning)"
    return option.default()


def unit_of(option: Option) -> str:
    if option.field.annotation not in (int, float):
        return "-"
    for suffix, unit in SUFFIX_UNITS:
        if option.name.endswith(suffix):
            return unit
    return COUNT_UNITS.get(option.name, "?")


def _shown_default(default: Any) -> str:
    if default is REQUIRED:
        return "required"
    if default is None or default == {}:
        return "-"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if default == "(see meaning)":
        return "(see meaning)"
    return f"`{default}`"


def table(cls: type[Settings]) -> str:
    """The README's table: flag, environment, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for option in options(cls):
        shown = _shown_default(default_of(option))
        meaning = option.help.replace("|", "\\|")
        rows.append(f"| `{option.flag}` | `{option.env}` | {shown} | {meaning} |")
    return "\n".join(rows)


def reference() -> str:
    return "\n".join(f"### {title}\n\n{table(cls)}\n" for title, cls, _ in PROGRAMS)


def full_table(cls: type[Settings]) -> str:
    rows = [
        "| option | TOML key | environment | default | unit | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for option in options(cls):
        shown = _shown_default(default_of(option))
        meaning = option.help.replace("|", "\\|")
        rows.append(
            f"| `{option.flag}` | `{option.name}` | `{option.env}` | {shown} "
            f"| {unit_of(option)} | {meaning} |"
        )
    return "\n".join(rows)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def sample_toml(cls: type[Settings]) -> str:
    """Every option, commented out, at its default (or a placeholder when it has none)."""
    lines = []
    for option in options(cls):
        default = default_of(option)
        placeholder = '"' + (option.metavar or "VALUE") + '"'
        if default is REQUIRED:
            value, note = placeholder, "  (required)"
        elif default is None or default == "(see meaning)":
            value, note = placeholder, "  (unset)"
        elif default == {}:
            value, note = '{ role = "web" }', "  (none by default)"
        else:
            value, note = _toml_value(default), ""
        lines.append(f"# {option.help}{note}")
        lines.append(f"# {option.name} = {value}")
    return "\n".join(lines)


def configuration_md() -> str:
    parts = [
        "# Configuration reference",
        "",
        "<!-- generated by scripts/config_reference.py (scripts/update_docs.py writes it; "
        "tests/test_docs.py checks it): do not edit by hand -->",
        "",
        "Each program reads its settings in layers: built-in defaults, then a TOML file, then "
        "environment variables, then command-line flags (flags win). The TOML file is the one "
        "given with `--config FILE` (for dispatchd and dispatch-agent also `DISPATCH_CONFIG` / "
        "`DISPATCH_AGENT_CONFIG`; for dispatchctl `DISPATCHCTL_CONFIG`, else "
        "`~/.config/dispatchctl.toml` when it exists); its keys are the option names with "
        "underscores. A value that is missing, malformed or out of range stops the program "
        "before it does anything, with a message naming the option and where the value came "
        "from (exit status 2); so does a key the program does not know. Repeatable options "
        "(`--label`) are a TOML table (`[labels]`) or `KEY=VALUE,KEY=VALUE` in the environment.",
        "",
        "Units: durations are seconds (`_s`) or milliseconds (`_ms`), sizes bytes (`_bytes`), "
        "rates per second (`_per_s`); the unit column says what the other numbers count. "
        "Samples for a service are in `packaging/etc/` (installed as `/etc/dispatch/*.toml`, "
        "see the README's *Running it as a service*).",
    ]
    for title, cls, where in PROGRAMS:
        parts += [
            "",
            f"## {title}",
            "",
            full_table(cls),
            "",
            f"Every option at its default, as a TOML file (`{where}`):",
            "",
            "```toml",
            sample_toml(cls),
            "```",
        ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(configuration_md() if "--full" in sys.argv else reference(), end="")
