"""Running one task: every host's commands, in order, under the task's and the daemon's limits.

One trio task per target host walks that host's commands in order; a host that fails skips the
rest of its commands unless the task says ``continue_on_error``. Each execution is followed to a
durable terminal state, which the writer reports back (``on_status_changes``): the dispatcher
decides, the ledger records, and the dispatcher acts on what was recorded, so a race between an
agent's result and a daemon decision has exactly one winner and the dispatcher sees that winner.

Who ends an execution, and when:
- the agent, with its result (exit, signal, its own enforcement of the command timeout);
- offline at dispatch: ``dispatch_failed`` / ``agent_offline``, or after ``delivery_timeout_s``
  of waiting, ``dispatch_failed`` / ``delivery_timeout``;
- agent gone mid-run and not back within ``agent_grace_s``: ``failed`` / ``agent_lost``
  (``daemon_restart`` when the daemon restarted and the agent never came back); back in time,
  its journal delivers the real result and nothing runs twice;
- agent connected but silent past timeout + kill grace + margin: a cancel is sent, then
  ``timed_out`` is recorded without its word;
- the user's cancel: a cancel to every agent involved; ``cancelled`` once the agent confirms the
  kill, or after kill grace + margin without confirmation;
- ``max_failures`` exceeded: nothing new starts; what has not started ends ``cancelled`` /
  ``error_threshold``.
A daemon shutdown is none of these: executions stay in flight and are resumed on restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from daemon import task_records
from daemon.database import Database
from daemon.registry import AgentSession, Registry
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.task_records import PlannedExecution, TaskPlan
from daemon.writer import Writer
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_RESUMABLE = frozenset({ExecStatus.DISPATCHED, ExecStatus.RUNNING})
# How long a cleanup that must not be interrupted waits for the writer to record an outcome.
_RECORD_WAIT_S = 30.0


@dataclass(eq=False)
class InFlight:
    """One execution the dispatcher is following; poked whenever something about it changes."""

    id: int
    host_id: str
    run: pb.Run | None = None  # set once dispatched (kept to send again after a reconnect)
    started: bool = False
    status: ExecStatus | None = None  # set when a terminal state is durable
    _poked: trio.Event = field(default_factory=trio.Event)

    def poke(self) -> None:
        self._poked.set()

    async def wait_poked(self) -> None:
        await self._poked.wait()
        self._poked = trio.Event()


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
    def __init__(
        self,
        *,
        registry: Registry,
        writer: Writer,
        database: Database,
        max_running_executions: int,
        agent_grace_s: float,
        kill_grace_s: float,
        report_margin_s: float,
        max_output_bytes: int,
    ) -> None:
        self._registry = registry
        self._writer = writer
        self._database = database
        self._slots = trio.CapacityLimiter(max_running_executions)
        self._agent_grace_s = agent_grace_s
        self._kill_grace_s = kill_grace_s
        self._report_margin_s = report_margin_s
        self._max_output_bytes = max_output_bytes
        self._runs: dict[int, TaskRun] = {}
        self._in_flight: dict[int, InFlight] = {}
        self._by_host: dict[str, set[InFlight]] = {}
        writer.add_listener(self.on_status_changes)
        registry.on_arrival(self.on_arrival)
        registry.on_departure(self.on_departure)

    # ------------------------------------------------------------------ notifications

    def on_status_changes(self, changes: Sequence[tuple[int, ExecStatus, str | None]]) -> None:
        for ch_id, status, _reason in changes:
            flight = self._in_flight.get(ch_id)
            if flight is None:
                continue
            if status == ExecStatus.RUNNING:
                flight.started = True
            elif status.terminal:
                flight.status = status
            flight.poke()

    async def on_arrival(self, session: AgentSession) -> None:
        """An agent (re)connected: reconcile what it holds with what is in flight on it."""
        flights = list(self._by_host.get(session.host_id, ()))
        await self._reconcile(session, flights)
        for flight in flights:
            flight.poke()
        strangers = [i for i in session.known_ids if i not in self._in_flight]
        if strangers:
            await self._cancel_finished(session, strangers)

    async def _reconcile(self, session: AgentSession, flights: Sequence[InFlight]) -> None:
        """Send again what never reached the agent; record as lost what it forgot it started."""
        lost: list[int] = []
        for flight in flights:
            if flight.run is None or flight.status is not None or flight.id in session.known_ids:
                continue  # not dispatched yet, over, or held by the agent (its journal replays it)
            if flight.started:
                lost.append(flight.id)
            else:
                session.send_run_nowait(flight.run)
        if lost:
            await self._writer.settle(
                lost,
                ExecStatus.FAILED,
                Reason.AGENT_LOST,
                "the agent came back without any record of this execution "
                "(its state directory was lost)",
            )

    async def _cancel_finished(self, session: AgentSession, ids: list[int]) -> None:
        """An agent still holds executions the record says are over: stop them there too."""
        statuses = await self._database.read(task_records.execution_statuses, ids)
        over = [i for i, status in statuses.items() if status.terminal]
        if over:
            logger.info(
                "host %s still holds %d finished executions; cancelling them there",
                session.host_id,
                len(over),
            )
            session.send_cancel_nowait(over)

    def on_departure(self, host_id: str) -> None:
        for flight in self._by_host.get(host_id, ()):
            flight.poke()

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
        with trio.CancelScope(shield=True), trio.move_on_after(_RECORD_WAIT_S):
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
                await self._writer.settle(
                    [e.id for host in waiting for e in host], ExecStatus.CANCELLED,
                    Reason.ERROR_THRESHOLD,
                    f"not started: more than {run.plan.max_failures} hosts failed",
                )  # fmt: skip
        except trio.Cancelled:
            if run.user_cancelled:
                with trio.CancelScope(shield=True):
                    await self._writer.settle(
                        [e.id for host in waiting for e in host], ExecStatus.CANCELLED,
                        Reason.USER_CANCEL, "cancelled before it started",
                    )  # fmt: skip
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
                    status = await self._execute(run, planned)
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
                await self._writer.settle(
                    [e.id for e in remaining], ExecStatus.CANCELLED, Reason.ERROR_THRESHOLD,
                    f"not started: more than {run.plan.max_failures} hosts failed",
                )  # fmt: skip
        except trio.Cancelled:
            if run.user_cancelled:
                with trio.CancelScope(shield=True):
                    # The execution in progress settled itself first; settling is conditional,
                    # so this only ends the ones that never began.
                    await self._writer.settle(
                        [e.id for e in remaining], ExecStatus.CANCELLED, Reason.USER_CANCEL,
                        "cancelled before it started",
                    )  # fmt: skip
            raise
        finally:
            if slot is not None:
                assert run.host_slots is not None
                run.host_slots.release_on_behalf_of(slot)

    # ------------------------------------------------------------------ executions

    async def _execute(self, run: TaskRun, planned: PlannedExecution) -> ExecStatus:
        flight = InFlight(planned.id, planned.host_id)
        self._in_flight[flight.id] = flight
        self._by_host.setdefault(flight.host_id, set()).add(flight)
        try:
            if planned.status in _RESUMABLE:
                return await self._resume(run, planned, flight)
            return await self._dispatch(run, planned, flight)
        finally:
            del self._in_flight[flight.id]
            host_flights = self._by_host[flight.host_id]
            host_flights.discard(flight)
            if not host_flights:
                del self._by_host[flight.host_id]

    async def _dispatch(
        self, run: TaskRun, planned: PlannedExecution, flight: InFlight
    ) -> ExecStatus:
        try:
            if not await self._wait_for_agent(run, flight):
                return await self._wait_terminal(flight)
            async with self._slots:
                if run.stop_reason is not None:
                    await self._writer.settle(
                        [flight.id],
                        ExecStatus.CANCELLED,
                        run.stop_reason,
                        "not started: too many hosts failed",
                    )
                    return await self._wait_terminal(flight)
                session = self._registry.current(flight.host_id)
                if session is None:  # left while this execution waited for a slot
                    await self._writer.settle(
                        [flight.id],
                        ExecStatus.DISPATCH_FAILED,
                        Reason.AGENT_OFFLINE,
                        "the agent went offline before dispatch",
                    )
                    return await self._wait_terminal(flight)
                flight.run = self._build_run(run, planned)
                await self._writer.mark_dispatched([flight.id])
                session.send_run_nowait(flight.run)
                return await self._follow(run, flight, resumed=False)
        except trio.Cancelled:
            if run.user_cancelled and flight.run is None:
                with trio.CancelScope(shield=True):
                    await self._writer.settle(
                        [flight.id],
                        ExecStatus.CANCELLED,
                        Reason.USER_CANCEL,
                        "cancelled before it started",
                    )
            raise

    async def _wait_for_agent(self, run: TaskRun, flight: InFlight) -> bool:
        """True once the host is connected; False (and settled) if it is not in time."""
        if self._registry.is_connected(flight.host_id):
            return True
        patience = run.plan.delivery_timeout_s
        if patience > 0:
            with trio.move_on_after(patience):
                await self._registry.wait_connected(flight.host_id)
                return True
            await self._writer.settle(
                [flight.id],
                ExecStatus.DISPATCH_FAILED,
                Reason.DELIVERY_TIMEOUT,
                f"the agent did not connect within {patience:g} s",
            )
        else:
            await self._writer.settle(
                [flight.id],
                ExecStatus.DISPATCH_FAILED,
                Reason.AGENT_OFFLINE,
                "the agent was not connected",
            )
        return False

    async def _resume(
        self, run: TaskRun, planned: PlannedExecution, flight: InFlight
    ) -> ExecStatus:
        """An execution in flight when the daemon stopped: its agent's journal tells the end."""
        flight.run = self._build_run(run, planned)
        flight.started = planned.status == ExecStatus.RUNNING
        # Registered first, then read: a change committed in between is seen one way or the other.
        current = await self._database.read(task_records.execution_statuses, [flight.id])
        status = current.get(flight.id, planned.status)
        if status.terminal:
            return status
        flight.started = flight.started or status == ExecStatus.RUNNING
        session = self._registry.current(flight.host_id)
        if session is not None:  # it came back before this task was resumed
            await self._reconcile(session, [flight])
        return await self._follow(run, flight, resumed=True)

    async def _follow(self, run: TaskRun, flight: InFlight, *, resumed: bool) -> ExecStatus:
        """Wait for the execution's durable end, deciding it ourselves where the agent cannot."""
        assert flight.run is not None
        timeout_s = flight.run.timeout_ms / 1000
        report_by = trio.current_time() + timeout_s + self._kill_grace_s + self._report_margin_s
        if resumed:
            report_by += self._agent_grace_s
        try:
            while flight.status is None:
                if not self._registry.is_connected(flight.host_id):
                    if not await self._await_return(flight):
                        reason = Reason.DAEMON_RESTART if resumed else Reason.AGENT_LOST
                        await self._writer.settle(
                            [flight.id], ExecStatus.FAILED, reason,
                            f"the agent was gone for {self._agent_grace_s:g} s and did not "
                            "report this execution",
                        )  # fmt: skip
                        return await self._wait_terminal(flight)
                    continue
                with trio.move_on_at(report_by) as overdue:
                    while flight.status is None and self._registry.is_connected(flight.host_id):
                        await flight.wait_poked()
                if overdue.cancelled_caught and flight.status is None:
                    return await self._stop(
                        flight, Reason.TIMEOUT, "timed out; the agent did not confirm the kill"
                    )
            return flight.status
        except trio.Cancelled:
            if run.user_cancelled:
                with trio.CancelScope(shield=True):
                    await self._stop(
                        flight, Reason.USER_CANCEL, "cancelled; the agent did not confirm the kill"
                    )
            raise

    async def _await_return(self, flight: InFlight) -> bool:
        """Within the grace, wait for the agent to come back (or the execution to end)."""
        with trio.move_on_after(self._agent_grace_s):
            while flight.status is None and not self._registry.is_connected(flight.host_id):
                await flight.wait_poked()
            return True
        return flight.status is not None or self._registry.is_connected(flight.host_id)

    async def _stop(self, flight: InFlight, reason: Reason, unconfirmed: str) -> ExecStatus:
        """Have the agent kill the execution; record it ourselves if it does not confirm."""
        await self._writer.note_cancel([flight.id], reason)
        session = self._registry.current(flight.host_id)
        if session is not None:
            session.send_cancel_nowait([flight.id])
        with trio.move_on_after(self._kill_grace_s + self._report_margin_s):
            return await self._wait_terminal(flight)
        status = ExecStatus.TIMED_OUT if reason == Reason.TIMEOUT else ExecStatus.CANCELLED
        await self._writer.settle([flight.id], status, reason, unconfirmed)
        with trio.move_on_after(_RECORD_WAIT_S):
            return await self._wait_terminal(flight)
        logger.error(
            "execution %s: %s not recorded within %g s (is the database failing?)",
            flight.id,
            status,
            _RECORD_WAIT_S,
        )
        return status

    async def _wait_terminal(self, flight: InFlight) -> ExecStatus:
        while flight.status is None:
            await flight.wait_poked()
        return flight.status

    def _build_run(self, run: TaskRun, planned: PlannedExecution) -> pb.Run:
        command = run.plan.commands[planned.command_index]
        return pb.Run(
            command_host_id=planned.id,
            task_id=run.task_id,
            script=command.script,
            args=list(command.args),
            env=dict(command.env),
            cwd=command.cwd,
            timeout_ms=int(command.timeout_s * 1000),
            output_limit_bytes=self._max_output_bytes,
            kill_grace_ms=int(self._kill_grace_s * 1000),
        )

    def statistics(self) -> DispatcherStatistics:
        slots = self._slots.statistics()
        return DispatcherStatistics(
            tasks_running=len(self._runs),
            executions_in_flight=len(self._in_flight),
            executions_running_limit=int(slots.total_tokens),
            executions_waiting_for_slot=slots.tasks_waiting,
        )
