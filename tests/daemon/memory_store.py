"""The record in memory, for the engine's tests under ``MockClock``: no database, no threads.

The writer runs over ``MemoryStore.flush`` exactly as over the database's: the same ledger plans
each batch (order, deduplication, conditional transitions), and the rows land in dicts. The
engine reads the same dicts through the ``engine.records.TaskRecords`` shape.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from daemon.states import ExecStatus, TaskStatus
from daemon.store.flush import FlushResult
from daemon.store.ledger import Execution, Ledger, output_digest
from daemon.store.task_records import PlannedExecution, TaskPlan
from daemon.store.write_ops import Op, TaskChange
from daemon.taskspec import CommandSpec


@dataclass
class TaskRow:
    id: int
    status: TaskStatus
    commands: dict[int, CommandSpec]
    hosts: list[str]
    max_concurrency: int | None = None
    max_failures: int | None = None
    delivery_timeout_s: float = 0.0
    continue_on_error: bool = False
    cancel_requested: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


class MemoryStore:
    def __init__(self) -> None:
        self.tasks: dict[int, TaskRow] = {}
        self.executions: dict[int, Execution] = {}
        self._ids = itertools.count(1)
        self.flushes = 0

    # ------------------------------------------------------------------ what tests set up

    def create_task(
        self, hosts: Sequence[str], *scripts: str, timeout_s: float = 5.0, **settings: Any
    ) -> int:
        """A queued task: one execution per (host, command), ids in host-then-command order."""
        task_id = next(self._ids)
        commands = {i: CommandSpec(script=s, timeout_s=timeout_s) for i, s in enumerate(scripts)}
        self.tasks[task_id] = TaskRow(task_id, TaskStatus.QUEUED, commands, list(hosts), **settings)
        for host_id in hosts:
            for index in commands:
                ch_id = next(self._ids)
                self.executions[ch_id] = Execution(
                    id=ch_id,
                    task_id=task_id,
                    host_id=host_id,
                    command_index=index,
                    status=ExecStatus.PENDING,
                )
        return task_id

    def statuses(self, task_id: int) -> dict[tuple[str, int], tuple[ExecStatus, str | None]]:
        return {
            (ex.host_id, ex.command_index): (ex.status, ex.reason)
            for ex in self.executions.values()
            if ex.task_id == task_id
        }

    # ------------------------------------------------------------------ the writer's flush

    async def flush(self, ledger: Ledger, ops: Sequence[Op]) -> FlushResult:
        self.flushes += 1
        loaded = {
            i: self.executions[i].clone() for i in ledger.unknown_ids(ops) if i in self.executions
        }
        plan = ledger.plan(ops, loaded)
        for ex in plan.digests_from_rows:
            ex.output_digest = output_digest(ex, b"", b"")
        for ex in plan.changed.values():
            self.executions[ex.id] = ex.clone()
        applied = [self._apply(change) for change, _seq in plan.task_changes]
        rows = {
            change.task_id: self._row(change.task_id)
            for (change, _), ok in zip(plan.task_changes, applied, strict=True)
            if ok
        }
        return FlushResult(plan=plan, task_applied=applied, task_rows=rows)

    def _apply(self, change: TaskChange) -> bool:
        task = self.tasks.get(change.task_id)
        if task is None or task.status not in change.allowed_from:
            return False
        if change.to is not None:
            task.status = change.to
        task.fields.update(change.fields)
        task.cancel_requested = bool(task.fields.get("cancel_requested", task.cancel_requested))
        return True

    def _row(self, task_id: int) -> dict[str, Any]:
        task = self.tasks[task_id]
        return {
            "id": task_id,
            "status": task.status.value,
            "started_at": None,
            "finished_at": None,
            "error": task.fields.get("error"),
            "cancel_requested": task.cancel_requested,
        }

    # ------------------------------------------------------------------ engine.records

    async def load_plan(self, task_id: int) -> TaskPlan | None:
        task = self.tasks.get(task_id)
        if task is None:
            return None
        by_host: dict[str, list[PlannedExecution]] = {host: [] for host in task.hosts}
        for ex in sorted(self.executions.values(), key=lambda e: e.id):
            if ex.task_id == task_id:
                by_host[ex.host_id].append(
                    PlannedExecution(ex.id, ex.host_id, ex.command_index, ex.status)
                )
        return TaskPlan(
            task_id=task_id,
            status=task.status,
            started_at=task.fields.get("started_at"),
            max_concurrency=task.max_concurrency,
            max_failures=task.max_failures,
            delivery_timeout_s=task.delivery_timeout_s,
            continue_on_error=task.continue_on_error,
            cancel_requested=task.cancel_requested,
            commands=task.commands,
            by_host=by_host,
        )

    async def status_counts(self, task_id: int) -> dict[ExecStatus, int]:
        counts: dict[ExecStatus, int] = {}
        for ex in self.executions.values():
            if ex.task_id == task_id:
                counts[ex.status] = counts.get(ex.status, 0) + 1
        return counts

    async def unfinished_execution_ids(self, task_id: int) -> list[int]:
        return [
            ex.id
            for ex in self.executions.values()
            if ex.task_id == task_id and not ex.status.terminal
        ]

    async def execution_statuses(self, ids: Sequence[int]) -> dict[int, ExecStatus]:
        return {i: self.executions[i].status for i in ids if i in self.executions}

    async def tasks_in_status(
        self, status: TaskStatus, limit: int, exclude: Sequence[int] = ()
    ) -> list[int]:
        found = [t.id for t in self.tasks.values() if t.status == status and t.id not in exclude]
        return sorted(found)[:limit]
