"""Logging set-up for the programs: one line per event on stderr, plain or JSON.

Messages name what they are about the same way everywhere (``task 12``, ``host web-1``,
``execution 345``; the agent says ``command_host 345``). In JSON lines those ids are also fields
(``task_id``, ``host_id``, ``execution_id``), taken from the record's ``extra`` when a call gives
them, else from the message, so a log pipeline can filter on them without parsing text.
``fields`` adds constant ones (the agent's own ``host_id``).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping

_IDS_IN_TEXT = (
    ("task_id", re.compile(r"\btask (\d+)\b")),
    ("execution_id", re.compile(r"\b(?:execution|command_host) (\d+)\b")),
    ("host_id", re.compile(r"\bhost '?([A-Za-z0-9](?:[A-Za-z0-9._:-]*[A-Za-z0-9])?)")),
)


class JsonFormatter(logging.Formatter):
    def __init__(self, fields: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
            **self._fields,
        }
        for name, pattern in _IDS_IN_TEXT:
            given = getattr(record, name, None)
            if given is not None:
                entry[name] = str(given)
            elif name not in entry and (found := pattern.search(message)) is not None:
                entry[name] = found.group(1)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(
    level: str, *, json_lines: bool = False, fields: Mapping[str, str] | None = None
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(fields))
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpclib and hypercorn are chatty at INFO about every connection.
    for noisy in ("grpclib", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
