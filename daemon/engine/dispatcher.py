"""Running one task: every host's commands, in order, under the task's and the daemon's limits.

Hosts are launched in target order; with ``max_concurrency`` only that many walk at once. Each
host's walk runs its commands one after another (``daemon.engine.executions`` follows each to its
recorded end); a host that fails skips the rest of its commands unless the task says
``continue_on_error``. Past ``max_failures`` failed hosts nothing new starts: what has not started
ends ``cancelled`` / ``error_threshold``. The user's cancel reaches every execution in flight and
ends the rest ``cancelled`` before they start. A daemon shutdown records none of this: the task
stays running and is resumed on restart. When every host is done the task ends ``completed``
(every execution succeeded), ``cancelled`` (by the user) or ``failed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from daemon.engine.executions import RECORD_WAIT_S, ExecutionFollower
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store import task_records
from daemon.store.database import Database
from daemon.store.task_records import PlannedExecution, TaskPlan
from daemon.store.writer import Writer

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TaskRun:
    task_id: int
    plan: TaskPlan = field(init=False)  # loaded after the run is registered for cancels
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    user_cancelled: bool = False
    stop_reason: Reason | None = None  # set once no new execution may start
    failed_hosts: int = 0
    host_slots: trio.CapacityLimiter | None = None

    def host_failed(self) -> None:
        self.failed_hosts += 1
        limit = self.plan.max_failures
        if limit is not None and self.failed_hosts > limit and self.stop_reason is None:
            self.stop_reason = Reason.ERROR_THRESHOLD
            logger.info(
                "task %s: %d hosts failed (more than %d); nothing new starts",
                self.task_id,
                self.failed_hosts,
                limit,
            )


@dataclass(frozen=True)
class DispatcherStatistics:
    tasks_running: int
    executions_in_flight: int
    executions_running_limit: int
    executions_waiting_for_slot: int


class Dispatcher:
    def __init__(self, *, follower: ExecutionFollower, writer: Writer, database: Database) -> None:
        self._executions = follower
        self._writer = writer
        self._database = database
        self._runs: dict[int, TaskRun] = {}

    # ------------------------------------------------------------------ tasks

    def cancel_task(self, task_id: int) -> bool:
        run = self._runs.get(task_id)
        if run is None:
            return False
        run.user_cancelled = True
        run.scope.cancel()
        return True

    async def run_task(self, task_id: int) -> TaskStatus | None:
        """Run (or resume) a queued or running task to its end; returns its final status."""
        run = TaskRun(task_id)
        self._runs[task_id] = run  # before reading: a cancel from now on is not missed
        try:
            plan = await self._database.read(task_records.load_plan, task_id)
            if plan is None or plan.status not in (TaskStatus.QUEUED, TaskStatus.RUNNING):
                return None
            run.plan = plan
            if plan.cancel_requested:
                run.user_cancelled = True
                run.scope.cancel()
            started = await self._writer.change_task(
                task_id,
                TaskStatus.RUNNING,
                frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING}),
                started_at=plan.started_at or time.time(),
            )
            if not started:
                return None  # cancelled while it waited in the queue
            if plan.max_concurrency is not None:
                run.host_slots = trio.CapacityLimiter(plan.max_concurrency)
            resumed = plan.status == TaskStatus.RUNNING
            logger.info(
                "task %s %s: %d hosts, %d commands",
                task_id,
                "resumed" if resumed else "started",
                len(plan.by_host),
                len(plan.commands),
            )
            with run.scope:
                async with trio.open_nursery() as hosts:
                    await self._launch_hosts(run, hosts)
            return await self._finish_task(run)
        finally:
            del self._runs[task_id]

    async def abandon_task(self, task_id: int) -> None:
        """End a task whose run failed with an internal error, and everything it left open."""
        with trio.CancelScope(shield=True), trio.move_on_after(RECORD_WAIT_S):
            ids = await self._database.read(task_records.unfinished_execution_ids, task_id)
            await self._writer.settle(
                ids,
                ExecStatus.FAILED,
                Reason.INTERNAL_ERROR,
                "internal error in the daemon; see its log",
            )
            await self._writer.change_task(
                task_id, TaskStatus.FAILED, frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING}),
                finished_at=time.time(), error="internal error in the daemon; see its log",
            )  # fmt: skip

    async def _finish_task(self, run: TaskRun) -> TaskStatus:
        counts = await self._database.read(task_records.status_counts, run.task_id)
        unfinished = [s for s in counts if not s.terminal]
        if unfinished:  # a bug if it happens; never leave an execution running forever
            logger.error("task %s ended with executions still %s", run.task_id, unfinished)
        total = sum(counts.values())
        succeeded = counts.get(ExecStatus.SUCCEEDED, 0)
        if run.user_cancelled:
            final, error = TaskStatus.CANCELLED, "cancelled by user"
        elif succeeded == total:
            final, error = TaskStatus.COMPLETED, None
        else:
            final = TaskStatus.FAILED
            error = f"{total - succeeded} of {total} executions did not succeed"
            if run.stop_reason == Reason.ERROR_THRESHOLD:
                error += f"; stopped after {run.failed_hosts} hosts failed"
        await self._writer.change_task(
            run.task_id, final, frozenset({TaskStatus.RUNNING}),
            finished_at=time.time(), error=error,
        )  # fmt: skip
        logger.info("task %s %s (%d/%d succeeded)", run.task_id, final, succeeded, total)
        return final

    # ------------------------------------------------------------------ hosts

    async def _launch_hosts(self, run: TaskRun, hosts: trio.Nursery) -> None:
        """Start each host's walk in target order, taking the host's slot on its behalf first,
        so a rollout with ``max_concurrency`` goes host by host in the order asked for (trio
        schedules tasks in no promised order) and only that many walks exist at once."""
        waiting = list(run.plan.by_host.values())
        try:
            while waiting and run.stop_reason is None:
                executions = waiting[0]
                slot = None
                if run.host_slots is not None and not all(e.status.terminal for e in executions):
                    slot = object()
                    await run.host_slots.acquire_on_behalf_of(slot)
                    if run.stop_reason is not None:
                        run.host_slots.release_on_behalf_of(slot)
                        break
                waiting.pop(0)
                hosts.start_soon(self._run_host, run, executions, slot)
            if waiting:
                await self._end_unstarted(run, [e for host in waiting for e in host])
        except trio.Cancelled:
            if run.user_cancelled:
                with trio.CancelScope(shield=True):
                    await self._end_unstarted(run, [e for host in waiting for e in host])
            raise

    async def _run_host(
        self, run: TaskRun, executions: list[PlannedExecution], slot: object | None
    ) -> None:
        """Walk one host's commands in order; a failure skips the rest (unless told not to)."""
        remaining = list(executions)
        try:
            while remaining:
                planned = remaining[0]
                if planned.status.terminal:  # resumed after a restart: already over
                    status = planned.status
                elif run.stop_reason is not None:
                    break
                else:
                    status = await self._executions.execute(run, planned)
                remaining.pop(0)
                if status in (ExecStatus.SUCCEEDED, ExecStatus.CANCELLED):
                    continue
                run.host_failed()
                if not run.plan.continue_on_error:
                    await self._writer.settle(
                        [e.id for e in remaining], ExecStatus.SKIPPED, Reason.PREVIOUS_FAILED,
                        f"skipped: command {planned.command_index} did not succeed on this host",
                    )  # fmt: skip
                    return
            if remaining:
                await self._end_unstarted(run, remaining)
        except trio.Cancelled:
            if run.user_cancelled:
                with trio.CancelScope(shield=True):
                    # The execution in progress settled itself first; settling is conditional,
                    # so this only ends the ones that never began.
                    await self._end_unstarted(run, remaining)
            raise
        finally:
            if slot is not None:
                assert run.host_slots is not None
                run.host_slots.release_on_behalf_of(slot)

    # ------------------------------------------------------------------ executions

    async def _end_unstarted(self, run: TaskRun, executions: list[PlannedExecution]) -> None:
        """End executions that will never start: the user cancelled, or too many hosts failed."""
        if run.user_cancelled:
            reason, message = Reason.USER_CANCEL, "cancelled before it started"
        else:
            reason = Reason.ERROR_THRESHOLD
            message = f"not started: more than {run.plan.max_failures} hosts failed"
        await self._writer.settle([e.id for e in executions], ExecStatus.CANCELLED, reason, message)

    def statistics(self) -> DispatcherStatistics:
        follower = self._executions.statistics()
        return DispatcherStatistics(
            tasks_running=len(self._runs),
            executions_in_flight=follower.in_flight,
            executions_running_limit=follower.running_limit,
            executions_waiting_for_slot=follower.waiting_for_slot,
        )
