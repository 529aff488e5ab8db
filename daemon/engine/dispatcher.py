"""The running tasks, and what reaches them: committed changes and agents coming and going.

Each running task is one ``TaskRun`` (``engine.task_run``), run by the scheduler in a trio task
of its own. ``Dispatcher.serve`` reads two channels, each in its own task, and hands what they
bring to the tasks concerned, without waiting: the writer's committed values (transitions of
their executions, by task id) and the agents' presence (to the tasks with an execution on the
host). The daemon-wide execution limit is shared by all of them (``engine.slots``).

An agent that comes back still holding executions the record says are over is told to cancel
them there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import trio

from daemon.engine.executions import ExecutionLimits
from daemon.engine.fleet import Arrived, Departed, Fleet, Presence
from daemon.engine.inbox import AgentArrived, AgentLeft, CancelRequested, Transition
from daemon.engine.records import TaskRecords
from daemon.engine.slots import ExecutionSlots
from daemon.engine.task_run import TaskRun
from daemon.engine.timers import RECORD_WAIT_S
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store.commits import Committed
from daemon.store.writer import Writer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatcherStatistics:
    tasks_running: int
    executions_in_flight: int
    executions_running_limit: int
    executions_waiting_for_slot: int


class Dispatcher:
    def __init__(
        self,
        *,
        writer: Writer,
        records: TaskRecords,
        fleet: Fleet,
        max_running_executions: int,
        limits: ExecutionLimits,
    ) -> None:
        self._writer = writer
        self._records = records
        self._fleet = fleet
        self._slots = ExecutionSlots(max_running_executions)
        self._limits = limits
        self._runs: dict[int, TaskRun] = {}

    # ------------------------------------------------------------------ tasks

    async def run_task(self, task_id: int) -> TaskStatus | None:
        """Run (or resume) a queued or running task to its end; returns its final status."""
        run = TaskRun(
            task_id,
            writer=self._writer,
            records=self._records,
            fleet=self._fleet,
            slots=self._slots,
            limits=self._limits,
        )
        # Registered before it reads its plan: a change committed from now on reaches it.
        self._runs[task_id] = run
        try:
            return await run.run()
        finally:
            del self._runs[task_id]

    def cancel_task(self, task_id: int) -> bool:
        run = self._runs.get(task_id)
        if run is None:
            return False
        run.inbox.put(CancelRequested())
        return True

    async def abandon_task(self, task_id: int) -> None:
        """End a task whose run failed with an internal error, and everything it left open."""
        with trio.CancelScope(shield=True), trio.move_on_after(RECORD_WAIT_S):
            ids = await self._records.unfinished_execution_ids(task_id)
            await self._writer.settle(
                ids,
                ExecStatus.FAILED,
                Reason.INTERNAL_ERROR,
                "internal error in the daemon; see its log",
            )
            await self._writer.change_task(
                task_id,
                TaskStatus.FAILED,
                frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING}),
                finished_at=time.time(),
                error="internal error in the daemon; see its log",
            )

    async def fail_host(self, host_id: str, reason: Reason, message: str) -> int:
        """Settle every execution in flight on ``host_id`` as ``failed`` / ``reason`` (the host
        was revoked: nothing it reports counts any more). Returns how many were settled."""
        ids = sorted(i for run in self._runs.values() for i in run.executions.unsettled_on(host_id))
        if ids:
            logger.warning(
                "host %s: %d executions in flight settled failed (%s)", host_id, len(ids), reason
            )
            await self._writer.settle(ids, ExecStatus.FAILED, reason, message)
        return len(ids)

    # ------------------------------------------------------------------ what reaches them

    async def serve(
        self,
        commits: trio.MemoryReceiveChannel[Committed],
        presence: trio.MemoryReceiveChannel[Presence],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._route_commits, commits)
            nursery.start_soon(self._route_presence, presence)
            task_status.started()

    async def _route_commits(self, commits: trio.MemoryReceiveChannel[Committed]) -> None:
        async with commits:
            async for committed in commits:
                by_run: dict[TaskRun, list[Transition]] = {}
                for ch_id, status, _reason in committed.transitions:
                    if status == ExecStatus.DISPATCHED:
                        continue  # the task's own decision
                    run = self._runs.get(committed.executions[ch_id].task_id)
                    if run is not None:
                        by_run.setdefault(run, []).append(Transition(ch_id, status))
                for run, transitions in by_run.items():
                    run.inbox.put_all(transitions)

    async def _route_presence(self, presence: trio.MemoryReceiveChannel[Presence]) -> None:
        async with presence:
            async for news in presence:
                if isinstance(news, Departed):
                    for run in self._runs.values():
                        if run.executions.on_host(news.host_id):
                            run.inbox.put(AgentLeft(news.host_id))
                    continue
                session = news.session
                for run in self._runs.values():
                    if run.executions.on_host(session.host_id):
                        run.inbox.put(AgentArrived(session))
                strangers = [
                    i
                    for i in session.known_ids
                    if not any(r.executions.holds(i) for r in self._runs.values())
                ]
                if strangers:
                    await self._cancel_finished(news, strangers)

    async def _cancel_finished(self, news: Arrived, ids: list[int]) -> None:
        """An agent still holds executions the record says are over: stop them there too."""
        statuses = await self._records.execution_statuses(ids)
        over = [i for i, status in statuses.items() if status.terminal]
        if over:
            logger.info(
                "host %s still holds %d finished executions; cancelling them there",
                news.session.host_id,
                len(over),
            )
            news.session.send_cancel_nowait(over)

    def statistics(self) -> DispatcherStatistics:
        slots = self._slots.statistics()
        return DispatcherStatistics(
            tasks_running=len(self._runs),
            executions_in_flight=sum(len(run.executions) for run in self._runs.values()),
            executions_running_limit=slots.total,
            executions_waiting_for_slot=slots.waiting,
        )
