"""Print the configuration reference of dispatchd and dispatch-agent as Markdown tables, from the
settings dataclasses themselves (``tests/test_docs.py`` checks the README carries this text).

    python scripts/config_reference.py
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.config import ENV_PREFIX as AGENT_PREFIX  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from common.settings import env_name, flag_name  # noqa: E402
from daemon.config import ENV_PREFIX as DAEMON_PREFIX  # noqa: E402
from daemon.config import DaemonConfig  # noqa: E402


def table(cls: type, prefix: str) -> str:
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            made = field.default_factory()
            default = made if isinstance(made, dict | list | tuple) else "(see meaning)"
        else:
            default = "required"
        if default is None:
            default = "-"
        elif isinstance(default, bool):
            default = str(default).lower()
        elif isinstance(default, dict):
            default = "-" if not default else default
        shown = f"`{default}`" if default not in ("-", "required", "(see meaning)") else default
        meaning = field.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{flag_name(field)}` | `{env_name(prefix, field)}` | {shown} | {meaning} |")
    return "\n".join(rows)


def reference() -> str:
    return (
        "### dispatchd\n\n" + table(DaemonConfig, DAEMON_PREFIX) + "\n\n"
        "### dispatch-agent\n\n" + table(AgentConfig, AGENT_PREFIX) + "\n"
    )


if __name__ == "__main__":
    print(reference(), end="")
