"""What the engine reads of the record, as the engine sees it.

The engine reads little (a task's plan, counts, the queue) and always through this shape, so a
running task's state is derived from the record alone (as several daemons sharing one database
will need) and the engine's tests can give it an in-memory record instead of a database.
``DatabaseRecords`` is the real one: each read is a ``store.task_records`` query in a reader
thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from daemon.states import ExecStatus, TaskStatus
from daemon.store import task_records
from daemon.store.database import Database
from daemon.store.task_records import TaskPlan


class TaskRecords(Protocol):
    async def load_plan(self, task_id: int) -> TaskPlan | None: ...

    async def status_counts(self, task_id: int) -> dict[ExecStatus, int]: ...

    async def unfinished_execution_ids(self, task_id: int) -> list[int]: ...

    async def execution_statuses(self, ids: Sequence[int]) -> dict[int, ExecStatus]: ...

    async def tasks_in_status(
        self, status: TaskStatus, limit: int, exclude: Sequence[int] = ()
    ) -> list[int]:
        """Oldest first: tasks run in the order they were queued."""
        ...


class DatabaseRecords:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def load_plan(self, task_id: int) -> TaskPlan | None:
        return await self._database.read(task_records.load_plan, task_id)

    async def status_counts(self, task_id: int) -> dict[ExecStatus, int]:
        return await self._database.read(task_records.status_counts, task_id)

    async def unfinished_execution_ids(self, task_id: int) -> list[int]:
        return await self._database.read(task_records.unfinished_execution_ids, task_id)

    async def execution_statuses(self, ids: Sequence[int]) -> dict[int, ExecStatus]:
        return await self._database.read(task_records.execution_statuses, ids)

    async def tasks_in_status(
        self, status: TaskStatus, limit: int, exclude: Sequence[int] = ()
    ) -> list[int]:
        return await self._database.read(task_records.tasks_in_status, status, limit, exclude)
