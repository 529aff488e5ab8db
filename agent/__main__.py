"""``dispatch-agent``: parse the settings, set up logging, run the agent until SIGTERM/SIGINT."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from agent import connection
from agent.config import load_config
from agent.journal_file import StateDirectoryError
from common import grpc_bridge
from common.logs import configure_logging
from common.runtime import tune_garbage_collection
from common.settings import SettingsError

EXIT_USAGE = 2
EXIT_STATE_DIRECTORY = 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv, os.environ)
    except SettingsError as exc:
        print(f"dispatch-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log_level, json_lines=config.log_json)
    tune_garbage_collection()
    problems: list[str] = []
    try:
        grpc_bridge.run(connection.run_agent, config)
    except* StateDirectoryError as group:  # raised through the bridge's nurseries
        problems = [str(exc) for exc in _leaves(group)]
    if problems:
        print(f"dispatch-agent: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_STATE_DIRECTORY
    return 0


def _leaves(group: BaseExceptionGroup[StateDirectoryError]) -> list[StateDirectoryError]:
    leaves: list[StateDirectoryError] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


if __name__ == "__main__":
    sys.exit(main())
