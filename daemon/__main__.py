"""``dispatchd``: parse settings, set up logging, run the daemon until SIGTERM/SIGINT."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence

from common import grpc_bridge, sd_notify
from common.logs import configure_logging
from common.runtime import tune_garbage_collection
from common.settings import SettingsError
from daemon import server
from daemon.config import load_config
from daemon.errors import StartupError

logger = logging.getLogger("daemon")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv, os.environ)
    except SettingsError as exc:
        print(f"dispatchd: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, json_lines=config.log_json)
    tune_garbage_collection()
    if config.insecure:
        logger.warning("running with --insecure: agents and API callers are not authenticated")
    try:
        notifier = sd_notify.from_environ(os.environ)  # Type=notify under systemd
        grpc_bridge.run(functools.partial(server.serve, notifier=notifier), config)
    except BaseException as exc:
        startup = _find(exc, StartupError)
        if startup is not None:
            logger.error("%s", startup)
            return 1
        if _find(exc, KeyboardInterrupt) is not None:
            return 0
        raise
    return 0


def _find(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first ``kind`` inside it (trio wraps errors in exception groups)."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


if __name__ == "__main__":
    sys.exit(main())
