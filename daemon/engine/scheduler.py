"""The task queue: started tasks run in the order they were queued, at most
``max_running_tasks`` at once (R5.5); the daemon-wide execution limit lives in the dispatcher.

The queue is the database (tasks in status ``queued``, oldest first), not memory: nothing queued
is lost in a restart, and a burst of starts costs rows, not RAM. At start-up, tasks that were
running when the daemon stopped are resumed before anything new starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from daemon.engine.dispatcher import Dispatcher
from daemon.engine.records import TaskRecords
from daemon.states import TaskStatus

logger = logging.getLogger(__name__)

_RESUME_BATCH = 10_000


@dataclass(frozen=True)
class SchedulerStatistics:
    running: int
    max_running: int


class Scheduler:
    def __init__(
        self, dispatcher: Dispatcher, records: TaskRecords, *, max_running_tasks: int
    ) -> None:
        self._dispatcher = dispatcher
        self._records = records
        self._max_running = max_running_tasks
        self._active: set[int] = set()
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None

    def wake(self) -> None:
        """Something was queued or finished: look at the queue again."""
        self._wakeup.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            interrupted = await self._records.tasks_in_status(TaskStatus.RUNNING, _RESUME_BATCH)
            if interrupted:
                logger.info(
                    "resuming %d tasks that were running when the daemon stopped", len(interrupted)
                )
            for task_id in interrupted:
                self._launch(task_id)
            task_status.started()
            while True:
                self._wakeup = trio.Event()
                await self._fill()
                await self._wakeup.wait()

    async def _fill(self) -> None:
        free = self._max_running - len(self._active)
        if free <= 0:
            return
        queued = await self._records.tasks_in_status(TaskStatus.QUEUED, free, sorted(self._active))
        for task_id in queued:
            self._launch(task_id)

    def _launch(self, task_id: int) -> None:
        assert self._nursery is not None
        self._active.add(task_id)
        self._nursery.start_soon(self._run, task_id, name=f"task-{task_id}")

    async def _run(self, task_id: int) -> None:
        try:
            await self._dispatcher.run_task(task_id)
        except Exception:
            # A bug while running one task must neither stop the others nor leave this one
            # running forever: it is recorded as failed, with the traceback in the log.
            logger.exception("task %s: internal error while running it", task_id)
            await self._dispatcher.abandon_task(task_id)
        finally:
            self._active.discard(task_id)
            self.wake()

    def statistics(self) -> SchedulerStatistics:
        return SchedulerStatistics(running=len(self._active), max_running=self._max_running)
