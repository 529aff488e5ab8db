"""Running one task: one state machine, in one trio task, that owns all its hosts' progress.

Hosts are launched in target order; with ``max_concurrency`` only that many are active at once.
An active host walks its commands one after another (``engine.executions`` takes each to its
recorded end); a host that fails skips the rest of its commands unless the task says
``continue_on_error``. Past ``max_failures`` failed hosts nothing new starts: what has not
started ends ``cancelled`` / ``error_threshold``. The user's cancel reaches every execution in
flight and ends the rest ``cancelled`` before they start. When every host is done the task ends
``completed`` (every execution succeeded), ``cancelled`` (by the user) or ``failed``. A daemon
shutdown records none of this: the task stays running and is resumed on restart, from what the
record says (``store.task_records.load_plan``).

The machine wakes for what its inbox brings and for its executions' next deadline; each wake-up
decides synchronously, then hands the writer and the agents what it decided, in that order (a
run leaves only after its ``dispatched`` mark is queued).
"""

from __future__ import annotations

import logging
import time
from collections import deque

import trio

from daemon.engine.executions import NOT_STARTED, ExecutionLimits, Executions
from daemon.engine.fleet import Fleet
from daemon.engine.flight import Host, TaskState
from daemon.engine.inbox import (
    AgentArrived,
    AgentLeft,
    CancelRequested,
    Inbox,
    Message,
    Outbox,
    SlotGranted,
    Transition,
)
from daemon.engine.records import TaskRecords
from daemon.engine.slots import ExecutionSlots
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store.task_records import PlannedExecution
from daemon.store.writer import Writer

logger = logging.getLogger(__name__)


class TaskRun:
    def __init__(
        self,
        task_id: int,
        *,
        writer: Writer,
        records: TaskRecords,
        fleet: Fleet,
        slots: ExecutionSlots,
        limits: ExecutionLimits,
    ) -> None:
        self.task_id = task_id
        self.inbox = Inbox()
        self._writer = writer
        self._records = records
        self._task = TaskState(task_id)
        self._outbox = Outbox()
        self.executions = Executions(
            self._task,
            inbox=self.inbox,
            outbox=self._outbox,
            fleet=fleet,
            slots=slots,
            limits=limits,
        )
        self._waiting: deque[Host] = deque()  # not launched yet, in target order
        self._active: dict[str, Host] = {}
        self._host_slots_free: int | None = None  # hosts that may still become active; None: any

    async def run(self) -> TaskStatus | None:
        """Run (or resume) a queued or running task to its end; returns its final status."""
        plan = await self._records.load_plan(self.task_id)
        if plan is None or plan.status not in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            return None
        started = await self._writer.change_task(
            self.task_id,
            TaskStatus.RUNNING,
            frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING}),
            started_at=plan.started_at or time.time(),
        )
        if not started:
            return None  # cancelled while it waited in the queue
        self._task.plan = plan
        self._host_slots_free = plan.max_concurrency
        logger.info(
            "task %s %s: %d hosts, %d commands",
            self.task_id,
            "resumed" if plan.status == TaskStatus.RUNNING else "started",
            len(plan.by_host),
            len(plan.commands),
        )
        self._waiting = deque(
            Host(host_id, deque(executions)) for host_id, executions in plan.by_host.items()
        )
        if plan.cancel_requested:
            self._cancel()
        while True:
            self._move_hosts_on()
            self._launch()
            await self._hand_out()
            if not (self._waiting or self._active):
                return await self._finish()
            with trio.move_on_at(self.executions.next_deadline()):
                await self.inbox.wait()
            for message in self.inbox.take():
                self._handle(message)
            self.executions.expire(trio.current_time())

    def _handle(self, message: Message) -> None:
        if isinstance(message, Transition):
            self.executions.on_transition(message.execution_id, message.status)
        elif isinstance(message, AgentArrived):
            self.executions.on_arrived(message.session)
        elif isinstance(message, AgentLeft):
            self.executions.on_left(message.host_id)
        elif isinstance(message, SlotGranted):
            self.executions.on_slot(message.flight)
        elif isinstance(message, CancelRequested):
            self._cancel()

    async def _finish(self) -> TaskStatus:
        counts = await self._records.status_counts(self.task_id)
        unfinished = [s for s in counts if not s.terminal]
        if unfinished:  # a bug if it happens; never leave an execution running forever
            logger.error("task %s ended with executions still %s", self.task_id, unfinished)
        total = sum(counts.values())
        succeeded = counts.get(ExecStatus.SUCCEEDED, 0)
        error: str | None
        if self._task.user_cancelled:
            final, error = TaskStatus.CANCELLED, "cancelled by user"
        elif succeeded == total:
            final, error = TaskStatus.COMPLETED, None
        else:
            final = TaskStatus.FAILED
            error = f"{total - succeeded} of {total} executions did not succeed"
            if self._task.stop_reason == Reason.ERROR_THRESHOLD:
                error += f"; stopped after {self._task.failed_hosts} hosts failed"
        await self._writer.change_task(
            self.task_id,
            final,
            frozenset({TaskStatus.RUNNING}),
            finished_at=time.time(),
            error=error,
        )
        logger.info("task %s %s (%d/%d succeeded)", self.task_id, final, succeeded, total)
        return final

    async def _hand_out(self) -> None:
        """Give the writer and the agents what this wake-up decided: cancel reasons before the
        cancels, the ``dispatched`` marks before the runs."""
        out = self._outbox.take()
        for reason, ids in out.cancel_notes.items():
            await self._writer.note_cancel(ids, reason)
        for session, execution_id in out.cancels:
            session.send_cancel_nowait([execution_id])
        for (status, reason, message), ids in out.settles.items():
            await self._writer.settle(ids, status, reason, message)
        if out.dispatches:
            await self._writer.mark_dispatched([run.command_host_id for _, run in out.dispatches])
        for session, run in (*out.dispatches, *out.resends):
            session.send_run_nowait(run)

    # ------------------------------------------------------------------ hosts

    def _launch(self) -> None:
        """Activate waiting hosts in target order, as far as the task's limit allows, taking a
        host's slot only if it has something left to run."""
        while self._waiting and not self._task.stopping:
            host = self._waiting[0]
            if not all(e.status.terminal for e in host.remaining):
                if self._host_slots_free == 0:
                    return
                if self._host_slots_free is not None:
                    self._host_slots_free -= 1
                    host.holds_task_slot = True
            self._waiting.popleft()
            self._active[host.host_id] = host
            self._advance(host)
        if self._waiting:  # nothing more starts: too many hosts failed, or the user cancelled
            self._end_unstarted([e.id for host in self._waiting for e in host.remaining])
            self._waiting.clear()

    def _move_hosts_on(self) -> None:
        """Hosts whose current execution ended go on to their next command, or are done."""
        for flight, status in self.executions.take_ended():
            host = flight.host
            host.remaining.popleft()
            if self._count_end(host, flight.planned, status):
                self._advance(host)

    def _advance(self, host: Host) -> None:
        """Start the host's next command, or finish the host."""
        while host.remaining:
            planned = host.remaining[0]
            if planned.status.terminal:  # resumed after a restart: already over
                host.remaining.popleft()
                if not self._count_end(host, planned, planned.status):
                    return
                continue
            if self._task.stopping:
                self._end_unstarted([e.id for e in host.remaining])
                host.remaining.clear()
                break
            self.executions.begin(planned, host)
            return
        self._host_done(host)

    def _count_end(self, host: Host, planned: PlannedExecution, status: ExecStatus) -> bool:
        """Count the end of one of the host's executions; False if that ended the host."""
        if status in (ExecStatus.SUCCEEDED, ExecStatus.CANCELLED):
            return True
        self._host_failed()
        if self._task.loaded.continue_on_error:
            return True
        self._outbox.settle(
            [e.id for e in host.remaining],
            ExecStatus.SKIPPED,
            Reason.PREVIOUS_FAILED,
            f"skipped: command {planned.command_index} did not succeed on this host",
        )
        host.remaining.clear()
        self._host_done(host)
        return False

    def _host_done(self, host: Host) -> None:
        self._active.pop(host.host_id, None)
        if host.holds_task_slot:
            host.holds_task_slot = False
            assert self._host_slots_free is not None
            self._host_slots_free += 1

    def _host_failed(self) -> None:
        task = self._task
        task.failed_hosts += 1
        limit = task.loaded.max_failures
        if limit is not None and task.failed_hosts > limit and task.stop_reason is None:
            task.stop_reason = Reason.ERROR_THRESHOLD
            logger.info(
                "task %s: %d hosts failed (more than %d); nothing new starts",
                self.task_id,
                task.failed_hosts,
                limit,
            )

    def _end_unstarted(self, ids: list[int]) -> None:
        """End executions that will never start: the user cancelled, or too many hosts failed."""
        if self._task.user_cancelled:
            self._outbox.settle(ids, ExecStatus.CANCELLED, Reason.USER_CANCEL, NOT_STARTED)
        else:
            message = f"not started: more than {self._task.loaded.max_failures} hosts failed"
            self._outbox.settle(ids, ExecStatus.CANCELLED, Reason.ERROR_THRESHOLD, message)

    def _cancel(self) -> None:
        """The user's cancel: stop what runs, end what has not started."""
        self._task.user_cancelled = True
        unstarted = [e.id for host in self._waiting for e in host.remaining]
        self._waiting.clear()
        for host in self._active.values():  # [0] is in flight; the rest never start
            while len(host.remaining) > 1:
                unstarted.append(host.remaining.pop().id)
        self.executions.cancel_all()
        self._end_unstarted(unstarted)
