"""What an operator can do with tasks: create, start, cancel, retry (the HTTP layer's use cases).

State changes go through the writer, in order with everything else, as conditional transitions:
two racing requests get one winner and the loser a clear answer (409), never a half-done change.
"""

from __future__ import annotations

import logging
import time

from daemon.engine.dispatcher import Dispatcher
from daemon.engine.scheduler import Scheduler
from daemon.errors import Conflict, NotFound
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store import task_records
from daemon.store.database import Database
from daemon.store.writer import Writer
from daemon.taskspec import TaskSpec

logger = logging.getLogger(__name__)

_NOT_STARTED = frozenset({TaskStatus.PENDING, TaskStatus.QUEUED})


class TaskService:
    def __init__(
        self,
        *,
        database: Database,
        writer: Writer,
        scheduler: Scheduler,
        dispatcher: Dispatcher,
        max_targets: int,
    ) -> None:
        self._database = database
        self._writer = writer
        self._scheduler = scheduler
        self._dispatcher = dispatcher
        self._max_targets = max_targets

    async def create(
        self,
        spec: TaskSpec,
        *,
        start: bool,
        idempotency_key: str | None,
        retry_of: int | None = None,
    ) -> int:
        task_id, created = await self._database.write(
            task_records.create_task,
            spec,
            start=start,
            idempotency_key=idempotency_key,
            max_targets=self._max_targets,
            retry_of=retry_of,
        )
        if created:
            logger.info(
                "task %s created (%r, %d commands)%s",
                task_id,
                spec.name,
                len(spec.commands),
                " and queued" if start else "",
            )
            if start:
                self._scheduler.wake()
        return task_id

    async def start(self, task_id: int) -> None:
        queued = await self._writer.change_task(
            task_id, TaskStatus.QUEUED, frozenset({TaskStatus.PENDING}), queued_at=time.time()
        )
        if not queued:
            status = await self._status(task_id)
            raise Conflict(f"task {task_id} is {status}; only a pending task can be started")
        logger.info("task %s queued", task_id)
        self._scheduler.wake()

    async def cancel(self, task_id: int) -> None:
        status = await self._status(task_id)
        if status in _NOT_STARTED:
            cancelled = await self._writer.change_task(
                task_id,
                TaskStatus.CANCELLED,
                _NOT_STARTED,
                finished_at=time.time(),
                cancel_requested=True,
                error="cancelled by user before it started",
            )
            if cancelled:
                pending = await self._database.read(
                    task_records.unfinished_execution_ids, task_id, only_pending=True
                )
                await self._writer.settle(
                    pending, ExecStatus.CANCELLED, Reason.USER_CANCEL, "cancelled before it started"
                )
                logger.info("task %s cancelled before it started", task_id)
                return
            status = await self._status(task_id)  # it started meanwhile
        if status == TaskStatus.RUNNING:
            await self._writer.change_task(
                task_id, None, frozenset({TaskStatus.RUNNING}), cancel_requested=True
            )
            self._dispatcher.cancel_task(task_id)
            logger.info("task %s: cancel requested", task_id)
        elif status != TaskStatus.CANCELLED:
            raise Conflict(f"task {task_id} already {status}; there is nothing to cancel")

    async def retry(self, task_id: int, *, only: str = "failed") -> int:
        if only != "failed":
            raise Conflict(f"retry only={only!r} is not supported; use only=failed")
        spec, _hosts = await self._database.read(task_records.retry_request, task_id)
        return await self.create(spec, start=True, idempotency_key=None, retry_of=task_id)

    async def _status(self, task_id: int) -> TaskStatus:
        status = await self._database.read(task_records.task_status, task_id)
        if status is None:
            raise NotFound(f"no task {task_id}")
        return status
