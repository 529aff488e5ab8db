"""How stored records look in the HTTP API and in live events (one shape for both).

Times are RFC 3339 UTC strings, durations seconds, ids strings (API.md).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from daemon.states import EXEC_TERMINAL


def rfc3339(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return (
        datetime.fromtimestamp(epoch_s, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def parse_rfc3339(text: str) -> float:
    """RFC 3339 / ISO 8601 text to epoch seconds; a time without a zone is taken as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


EXECUTION_FIELDS = (
    "id", "task_id", "command_index", "host_id", "status", "reason", "error", "exit_code",
    "signal", "dispatched_at", "started_at", "finished_at", "duration_s", "stdout_bytes",
    "stderr_bytes", "output_truncated",
)  # fmt: skip


def execution_view(row: dict[str, Any]) -> dict[str, Any]:
    """A CommandHost as the API shows it; ``row`` has the ``command_host`` columns by name
    (``task_id``/``command_id`` for the foreign keys)."""
    return {
        "id": str(row["id"]),
        "task_id": str(row["task_id"]),
        "command_index": row["command_index"],
        "host_id": row["host_id"],
        "status": row["status"],
        "reason": row["reason"],
        "error": row["error"],
        "exit_code": row["exit_code"],
        "signal": row["signal"],
        "dispatched_at": rfc3339(row["dispatched_at"]),
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "duration_s": row["duration_s"],
        "stdout_bytes": row["stdout_bytes"],
        "stderr_bytes": row["stderr_bytes"],
        "output_truncated": bool(row["output_truncated"]),
    }


def task_view(row: dict[str, Any], commands: list[dict[str, Any]]) -> dict[str, Any]:
    """A task as the API shows it, without progress (``queries`` adds it)."""
    started, finished = row["started_at"], row["finished_at"]
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "status": row["status"],
        "created_at": rfc3339(row["created_at"]),
        "queued_at": rfc3339(row["queued_at"]),
        "started_at": rfc3339(started),
        "finished_at": rfc3339(finished),
        "duration_s": (finished - started)
        if started is not None and finished is not None
        else None,
        "commands": [command_view(c) for c in commands],
        "targets": json.loads(row["targets"]),
        "max_concurrency": row["max_concurrency"],
        "max_failures": row["max_failures"],
        "delivery_timeout_s": row["delivery_timeout_s"],
        "continue_on_error": bool(row["continue_on_error"]),
        "retry_of": str(row["retry_of"]) if row["retry_of"] is not None else None,
        "cancel_requested": bool(row["cancel_requested"]),
        "error": row["error"],
    }


def command_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": row["index"],
        "script": row["script"],
        "args": json.loads(row["args"]),
        "env": json.loads(row["env"]),
        "cwd": row["cwd"],
        "timeout_s": row["timeout_s"],
    }


def progress_view(counts: dict[str, int]) -> dict[str, Any]:
    """``counts`` maps CommandHost status to how many are in it."""
    total = sum(counts.values())
    finished = sum(n for status, n in counts.items() if status in EXEC_TERMINAL)
    return {
        "total": total,
        "finished": finished,
        "percent": round(100.0 * finished / total, 2) if total else 100.0,
        "by_status": {status: n for status, n in sorted(counts.items()) if n},
    }


def host_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "hostname": row["hostname"],
        "labels": json.loads(row["labels"]),
        "status": row["status"],
        "connected_at": rfc3339(row["connected_at"]),
        "last_seen_at": rfc3339(row["last_seen_at"]),
        "first_seen_at": rfc3339(row["first_seen_at"]),
        "agent_version": row["agent_version"],
        "address": row["address"],
        "enrollment": row["enrollment"],
    }


def connection_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "connected_at": rfc3339(row["connected_at"]),
        "disconnected_at": rfc3339(row["disconnected_at"]),
        "address": row["address"],
        "agent_version": row["agent_version"],
        "close_reason": row["close_reason"],
    }


def task_event_view(row: dict[str, Any]) -> dict[str, Any]:
    """A task's state as the live ``task`` event carries it (``row``: the ``task`` columns)."""
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "started_at": rfc3339(row["started_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "error": row["error"],
    }


def token_view(row: dict[str, Any]) -> dict[str, Any]:
    """An API token as the API lists it: never the token, nor its hash."""
    return {
        "id": str(row["id"]),
        "name": row["name"],
        "role": row["role"],
        "created_at": rfc3339(row["created_at"]),
        "created_by": row["created_by"],
        "last_used_at": rfc3339(row["last_used_at"]),
        "revoked_at": rfc3339(row["revoked_at"]),
    }


def audit_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "at": rfc3339(row["at"]),
        "actor": row["actor"],
        "role": row["role"],
        "action": row["action"],
        "target": row["target"],
        "outcome": row["outcome"],
        "status": row["status"],
        "address": row["address"],
        "details": json.loads(row["details"] or "{}"),
    }
