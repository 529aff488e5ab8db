"""Retention deletes old history, and only that, in small transactions, on both databases."""

from __future__ import annotations

import time
from typing import Any

import peewee
import pytest
import trio

from daemon.store import retention
from daemon.store.database import Database
from daemon.store.models import AuditEvent, Command, CommandHost, HostConnection, OutputChunk, Task
from daemon.store.retention import DAY_S, Pruned, Retention
from tests.daemon.conftest import Rows

NOW = time.time()
OLD, RECENT = NOW - 40 * DAY_S, NOW - 1 * DAY_S


def service(database: Database, *, days: float = 30, batch_tasks: int = 500,
            interval_s: float = 3600) -> Retention:  # fmt: skip
    return Retention(database, days=days, interval_s=interval_s, batch_tasks=batch_tasks,
                     pause_s=0, clock=lambda: NOW)  # fmt: skip


def finished_task(rows: Rows, status: str, finished_at: float, hosts: int = 2,
                  chunks: int = 1) -> int:  # fmt: skip
    task_id = rows.task(status=status, created_at=finished_at - 60, finished_at=finished_at,
                        scripts=("echo a", "echo b"))  # fmt: skip
    for host in range(hosts):
        execution = rows.execution(task_id, f"h{host}", status="succeeded")
        for n in range(chunks):
            rows.chunk(execution, n * 2, b"x\n")
    return task_id


def remaining() -> dict[str, Any]:
    """What is left, by task id (for the rows of a task) or by name."""
    return {
        "tasks": sorted(t.id for t in Task.select(Task.id)),
        "commands": sorted({c.task_id for c in Command.select(Command.task)}),
        "executions": sorted({e.task_id for e in CommandHost.select(CommandHost.task)}),
        "chunks": sorted({c.task_id for c in OutputChunk.select(OutputChunk.task_id)}),
        "audit": sorted(a.action for a in AuditEvent.select()),
        "connections": sorted(c.host_id for c in HostConnection.select()),
    }


async def test_a_pass_deletes_old_finished_history_and_nothing_else(
    database: Database, rows: Rows, peewee_db: peewee.Database
) -> None:
    old = [finished_task(rows, status, OLD) for status in ("completed", "failed", "cancelled")]
    recent = finished_task(rows, "completed", RECENT)
    running = rows.task(status="running", created_at=OLD, started_at=OLD)  # never finished
    pending = rows.task(status="pending", created_at=OLD)
    with peewee_db.connection_context():
        for action, at in (("old.one", OLD), ("recent.one", RECENT)):
            AuditEvent.create(at=at, actor="bootstrap", action=action, outcome="ok")
    rows.connection("gone", connected_at=OLD - 10, disconnected_at=OLD)
    rows.connection("still", connected_at=OLD)  # still connected, however old
    rows.connection("lately", connected_at=RECENT, disconnected_at=RECENT)

    pruned = await service(database).prune(NOW - 30 * DAY_S)

    assert pruned == Pruned(tasks=3, executions=6, output_chunks=6, audit_events=1,
                            host_connections=1)  # fmt: skip
    after = await database.read(remaining)
    kept = sorted([recent, running, pending])
    assert after == {
        "tasks": kept,
        "commands": kept,  # the deleted tasks' commands went by the foreign keys' cascade
        "executions": [recent],
        "chunks": [recent],
        "audit": ["recent.one"],
        "connections": ["lately", "still"],
    }
    assert old[0] not in after["tasks"]
    assert await service(database).prune(NOW - 30 * DAY_S) == Pruned()  # nothing left to do


async def test_big_tasks_go_in_transactions_of_bounded_size(
    database: Database, rows: Rows, peewee_db: peewee.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = [finished_task(rows, "completed", OLD, hosts=13, chunks=2) for _ in range(3)]
    sizes: list[tuple[str, int]] = []
    real_delete_some, real_delete_tasks = retention.delete_some, retention.delete_tasks

    def delete_some(model: Any, condition: Any, limit: int) -> int:
        deleted = real_delete_some(model, condition, limit)
        sizes.append((model.__name__, deleted))
        return deleted

    def delete_tasks(ids: list[int]) -> int:
        deleted = real_delete_tasks(ids)
        sizes.append(("Task", deleted))
        return deleted

    monkeypatch.setattr(retention, "delete_some", delete_some)
    monkeypatch.setattr(retention, "delete_tasks", delete_tasks)
    pruned = await service(database, batch_tasks=2).prune(NOW - 30 * DAY_S)  # 20 rows at most
    assert pruned == Pruned(tasks=3, executions=39, output_chunks=78)
    # 2 tasks: 52 chunks in 20 + 20 + 12, 26 executions in 20 + 6; then the last task alone
    assert sizes == [
        ("OutputChunk", 20), ("OutputChunk", 20), ("OutputChunk", 12),
        ("CommandHost", 20), ("CommandHost", 6), ("Task", 2),
        ("OutputChunk", 20), ("OutputChunk", 6), ("CommandHost", 13), ("Task", 1),
        ("AuditEvent", 0), ("HostConnection", 0),
    ]  # fmt: skip
    with peewee_db.connection_context():
        assert Task.select().where(Task.id.in_(tasks)).count() == 0


async def test_the_service_prunes_at_start_and_keeps_going_after_a_database_error(
    database: Database, rows: Rows, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    finished_task(rows, "completed", OLD)
    failures = [peewee.OperationalError("database is locked")]
    real_delete_tasks = retention.delete_tasks

    def delete_tasks(ids: list[int]) -> int:
        if failures:
            raise failures.pop()
        return real_delete_tasks(ids)

    monkeypatch.setattr(retention, "delete_tasks", delete_tasks)
    pruner = service(database, interval_s=0.05)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(pruner.serve)
            while pruner.statistics().deleted.tasks == 0:  # noqa: ASYNC110 (a poll, bounded)
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    stats = pruner.statistics()
    assert (stats.failures, stats.deleted.tasks, stats.deleted.executions) == (1, 1, 2)
    assert stats.passes >= 2
    assert "retention pass stopped by a database error: database is locked" in caplog.text


async def test_retention_off_returns_at_once(database: Database) -> None:
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(service(database, days=0).serve)
