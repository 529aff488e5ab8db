"""The synchronous half of the writer: one batch, one transaction, in a worker thread.

Load the executions the batch touches that the ledger does not hold, let the ledger plan, write
the plan with plain ``executemany`` statements (peewee's query building costs more than SQLite on
this path), and read back what the notifications need. Nothing here keeps state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from peewee import Database

from daemon.states import ExecStatus
from daemon.store.ledger import (
    ROW_FIELDS,
    SETTLED_WITHOUT_AGENT,
    UPDATE_FIELDS,
    Execution,
    Ledger,
    Plan,
    StreamState,
    output_digest,
)
from daemon.store.models import execute_many
from daemon.store.write_ops import Op

_CHUNK = 500  # ids per IN (...) list


@dataclass
class FlushResult:
    plan: Plan
    task_applied: list[bool]
    task_rows: dict[int, dict[str, Any]] = field(default_factory=dict)


def flush(db: Database, ledger: Ledger, ops: Sequence[Op]) -> FlushResult:
    with db.atomic():
        loaded = load_executions(db, ledger.unknown_ids(ops), ledger.head_bytes)
        plan = ledger.plan(ops, loaded)
        applied = write_plan(db, plan)
    result = FlushResult(plan=plan, task_applied=applied)
    changed_tasks = [
        tc.task_id for (tc, _), ok in zip(plan.task_changes, applied, strict=True) if ok
    ]
    if changed_tasks:
        result.task_rows = task_rows(db, changed_tasks)
    return result


def load_executions(db: Database, ids: Sequence[int], head_bytes: int) -> dict[int, Execution]:
    found: dict[int, Execution] = {}
    columns = ", ".join(f'"{name}"' for name in ROW_FIELDS)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = _query(db, f"SELECT {columns} FROM command_host WHERE id IN ({marks})", chunk)
        for row in rows:
            values = dict(zip(ROW_FIELDS, row, strict=True))
            values["status"] = ExecStatus(values["status"])
            values["output_truncated"] = bool(values["output_truncated"])
            found[values["id"]] = Execution(**values)
    with_output = [
        i
        for i, ex in found.items()
        if ex.last_seq > 1
        and (ex.status == ExecStatus.RUNNING or ex.reason in SETTLED_WITHOUT_AGENT)
    ]
    for start in range(0, len(with_output), _CHUNK):
        chunk = with_output[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows = _query(
            db,
            f'SELECT command_host_id, stream, "offset", size FROM output_chunk '
            f'WHERE command_host_id IN ({marks}) ORDER BY command_host_id, stream, "offset"',
            chunk,
        )
        for ch_id, stream, offset, size in rows:
            # Output stored before this daemon started: its running hash is gone, so the
            # digest is taken from the stored rows when the execution ends.
            state = found[ch_id].streams.setdefault(stream, StreamState(hasher=None))
            state.stored_end = max(state.stored_end, offset + size)
            state.kept += size
            if offset >= head_bytes:
                state.tail_rows.append((offset, size))
    return found


def write_plan(db: Database, plan: Plan) -> list[bool]:
    execute_many(
        db,
        'INSERT INTO output_chunk (command_host_id, task_id, stream, "offset", size, data, '
        "change_seq) VALUES (?, ?, ?, ?, ?, ?, ?)",
        plan.output_rows,
    )
    execute_many(
        db,
        'DELETE FROM output_chunk WHERE command_host_id = ? AND stream = ? AND "offset" = ?',
        plan.pruned_rows,
    )
    for ex in plan.digests_from_rows:
        ex.output_digest = output_digest(ex, *_stream_hashes(db, ex.id))
    assignments = ", ".join(f'"{name}" = ?' for name in UPDATE_FIELDS)
    execute_many(
        db,
        f"UPDATE command_host SET {assignments} WHERE id = ?",
        (_update_row(ex) for ex in plan.changed.values()),
    )
    return [_apply_task_change(db, change, seq) for change, seq in plan.task_changes]


def _update_row(ex: Execution) -> tuple[Any, ...]:
    values = [getattr(ex, name) for name in UPDATE_FIELDS]
    values[UPDATE_FIELDS.index("status")] = ex.status.value
    return (*values, ex.id)


def _stream_hashes(db: Database, ch_id: int) -> tuple[bytes, bytes]:
    hashers = {1: hashlib.sha256(), 2: hashlib.sha256()}
    rows = _query(
        db,
        'SELECT stream, data FROM output_chunk WHERE command_host_id = ? ORDER BY stream, "offset"',
        [ch_id],
    )
    for stream, data in rows:
        hashers[stream].update(bytes(data))
    return hashers[1].digest(), hashers[2].digest()


def _apply_task_change(db: Database, change: Any, seq: int) -> bool:
    if not change.allowed_from:
        return False  # no status allows it (PostgreSQL refuses an empty IN list)
    fields = dict(change.fields)
    if change.to is not None:
        fields["status"] = change.to.value
    fields["change_seq"] = seq
    assignments = ", ".join(f'"{name}" = ?' for name in fields)
    allowed = [status.value for status in change.allowed_from]
    marks = ", ".join("?" * len(allowed))
    cursor = _execute(
        db,
        f"UPDATE task SET {assignments} WHERE id = ? AND status IN ({marks})",
        [*fields.values(), change.task_id, *allowed],
    )
    return bool(cursor.rowcount == 1)


def task_rows(db: Database, task_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    marks = ", ".join("?" * len(task_ids))
    rows = _query(
        db,
        f"SELECT id, status, started_at, finished_at, error, cancel_requested FROM task "
        f"WHERE id IN ({marks})",
        task_ids,
    )
    names = ("id", "status", "started_at", "finished_at", "error", "cancel_requested")
    return {row[0]: dict(zip(names, row, strict=True)) for row in rows}


def max_change_seq(db: Database) -> int:
    highest = 0
    for table in ("task", "command_host", "output_chunk"):
        (value,) = _query(db, f"SELECT MAX(change_seq) FROM {table}", [])[0]
        highest = max(highest, value or 0)
    return highest


def _execute(db: Database, sql: str, params: Sequence[Any]) -> Any:
    return db.execute_sql(_placeholders(db, sql), params)


def _query(db: Database, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    return list(_execute(db, sql, params).fetchall())


def _placeholders(db: Database, sql: str) -> str:
    return sql if db.param == "?" else sql.replace("?", db.param)
