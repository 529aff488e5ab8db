"""The configuration reference of dispatchd, dispatch-agent and dispatchctl, from the settings
dataclasses themselves: the README's tables (``reference()``) and ``docs/configuration.md``
(``configuration_md()``: every option with its TOML key, environment variable, default and unit,
and a sample TOML file per program). ``scripts/update_docs.py`` writes both; ``tests/test_docs.py``
checks they match the code.

    python scripts/config_reference.py            # the README tables
    python scripts/config_reference.py --full     # docs/configuration.md
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import ENV_PREFIX as AGENT_PREFIX  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from common.settings import env_name, flag_name  # noqa: E402
from daemon.config import ENV_PREFIX as DAEMON_PREFIX  # noqa: E402
from daemon.config import DaemonConfig  # noqa: E402
from dispatchctl.config import ENV_PREFIX as CTL_PREFIX  # noqa: E402
from dispatchctl.config import CtlConfig  # noqa: E402

# (title, settings class, environment prefix, where its TOML file usually is)
PROGRAMS = (
    ("dispatchd", DaemonConfig, DAEMON_PREFIX, "/etc/dispatch/dispatchd.toml"),
    ("dispatch-agent", AgentConfig, AGENT_PREFIX, "/etc/dispatch/dispatch-agent.toml"),
    ("dispatchctl", CtlConfig, CTL_PREFIX, "~/.config/dispatchctl.toml"),
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


def default_of(field: dataclasses.Field[Any]) -> Any:
    """The default, ``None`` when there is none, or ``dataclasses.MISSING`` when required."""
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        made = field.default_factory()
        return made if isinstance(made, dict | list | tuple) else "(see meaning)"
    return dataclasses.MISSING


def unit_of(cls: type, field: dataclasses.Field[Any]) -> str:
    kind = typing.get_type_hints(cls)[field.name]
    if kind not in (int, float):
        return "-"
    for suffix, unit in SUFFIX_UNITS:
        if field.name.endswith(suffix):
            return unit
    return COUNT_UNITS.get(field.name, "?")


def _shown_default(default: Any) -> str:
    if default is dataclasses.MISSING:
        return "required"
    if default is None or default == {}:
        return "-"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if default == "(see meaning)":
        return default
    return f"`{default}`"


def table(cls: type, prefix: str) -> str:
    """The README's table: flag, environment, default, meaning."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        shown = _shown_default(default_of(field))
        meaning = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{flag_name(field)}` | `{env_name(prefix, field)}` | {shown} | {meaning} |")
    return "\n".join(rows)


def reference() -> str:
    return "\n".join(f"### {title}\n\n{table(cls, prefix)}\n" for title, cls, prefix, _ in PROGRAMS)


def full_table(cls: type, prefix: str) -> str:
    rows = [
        "| option | TOML key | environment | default | unit | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for field in dataclasses.fields(cls):
        shown = _shown_default(default_of(field))
        meaning = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(
            f"| `{flag_name(field)}` | `{field.name}` | `{env_name(prefix, field)}` | {shown} "
            f"| {unit_of(cls, field)} | {meaning} |"
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


def sample_toml(cls: type) -> str:
    """Every option, commented out, at its default (or a placeholder when it has none)."""
    lines = []
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        default = default_of(field)
        placeholder = '"' + (field.metadata.get("metavar") or "VALUE") + '"'
        if default is dataclasses.MISSING:
            value, note = placeholder, "  (required)"
        elif default is None or default == "(see meaning)":
            value, note = placeholder, "  (unset)"
        elif default == {}:
            value, note = '{ role = "web" }', "  (none by default)"
        else:
            value, note = _toml_value(default), ""
        lines.append(f"# {help_text}{note}")
        lines.append(f"# {field.name} = {value}")
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
    for title, cls, prefix, where in PROGRAMS:
        parts += [
            "",
            f"## {title}",
            "",
            full_table(cls, prefix),
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
