"""What an operator asks for when creating a task, after the HTTP layer validated its shape.

The checks that need the database (do the target hosts exist, how many do the labels match)
happen in ``daemon.engine.tasks``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CommandSpec:
    script: str
    timeout_s: float
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str
    commands: tuple[CommandSpec, ...]
    target_hosts: tuple[str, ...] = ()
    target_labels: dict[str, str] = field(default_factory=dict)
    max_concurrency: int | None = None  # hosts running at once; None: no per-task limit
    max_failures: int | None = None  # failed hosts tolerated before the rest are cancelled
    delivery_timeout_s: float = 0.0  # wait this long for an offline target; 0: fail at once
    continue_on_error: bool = False  # run a host's later commands after one of them failed

    def digest(self) -> str:
        """Identifies the request body, for ``Idempotency-Key`` replays."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
