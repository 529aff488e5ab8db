"""Following one execution to its recorded end, deciding it where the agent cannot.

Who ends an execution, and when:
- the agent, with its result (exit, signal, its own enforcement of the command timeout);
- offline at dispatch: ``dispatch_failed`` / ``agent_offline``, or after ``delivery_timeout_s``
  of waiting, ``dispatch_failed`` / ``delivery_timeout``;
- agent gone mid-run and not back within ``agent_grace_s``: ``failed`` / ``agent_lost``
  (``daemon_restart`` when the daemon restarted and the agent never came back); back in time,
  its journal delivers the real result and nothing runs twice;
- agent connected but silent past timeout + kill grace + margin: a cancel is sent, then
  ``timed_out`` is recorded without its word;
- the user's cancel: a cancel to the agent; ``cancelled`` once the agent confirms the kill, or
  after kill grace + margin without confirmation;
- an administrator revoking the host: ``failed`` / ``host_revoked`` at once (``fail_host``), for
  everything in flight on it; its stream is closed and it will not be heard again.
Every decision is a conditional write through the writer; the follower then waits for the
durable end the writer reports (``on_status_changes``), so when an agent's result and a daemon
decision race, the follower sees the one that was recorded. A daemon shutdown decides nothing:
executions stay in flight and are resumed on restart.

When an agent comes back, what is in flight on it is reconciled with what it says it holds: a
run that never reached it is sent again; one it started but no longer knows (its state directory
was lost) is recorded as lost; executions the record says are over but it still holds are
cancelled there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from daemon.engine.fleet import AgentSession, Fleet
from daemon.states import ExecStatus, Reason
from daemon.store import task_records
from daemon.store.database import Database
from daemon.store.task_records import PlannedExecution, TaskPlan
from daemon.store.writer import Writer
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_RESUMABLE = frozenset({ExecStatus.DISPATCHED, ExecStatus.RUNNING})
# How long a cleanup that must not be interrupted waits for the writer to record an outcome.
RECORD_WAIT_S = 30.0


class TaskContext(Protocol):
    """What an execution needs to know about the task it belongs to."""

    task_id: int
    plan: TaskPlan
    user_cancelled: bool
    stop_reason: Reason | None


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


@dataclass(frozen=True)
class FollowerStatistics:
    in_flight: int
    running_limit: int
    waiting_for_slot: int


class ExecutionFollower:
    def __init__(
        self,
        *,
        registry: Fleet,
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

    async def fail_host(self, host_id: str, reason: Reason, message: str) -> int:
        """Settle every execution in flight on ``host_id`` as ``failed`` / ``reason`` (the host
        was revoked: nothing it reports counts any more). Returns how many were settled."""
        ids = sorted(f.id for f in self._by_host.get(host_id, ()) if f.status is None)
        if ids:
            logger.warning(
                "host %s: %d executions in flight settled failed (%s)", host_id, len(ids), reason
            )
            await self._writer.settle(ids, ExecStatus.FAILED, reason, message)
        return len(ids)

    # ------------------------------------------------------------------ one execution

    async def execute(self, run: TaskContext, planned: PlannedExecution) -> ExecStatus:
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
        self, run: TaskContext, planned: PlannedExecution, flight: InFlight
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

    async def _wait_for_agent(self, run: TaskContext, flight: InFlight) -> bool:
        """True once the host is connected; False (and settled) if it is not in time."""
        if self._registry.is_connected(flight.host_id):
            return True
        patience = run.plan.delivery_timeout_s
        if patience > 0:
            with trio.move_on_after(patience):
                # arrivals poke the host's flights; so does a settlement (fail_host) meanwhile
                while flight.status is None and not self._registry.is_connected(flight.host_id):
                    await flight.wait_poked()
                return flight.status is None
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
        self, run: TaskContext, planned: PlannedExecution, flight: InFlight
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

    async def _follow(self, run: TaskContext, flight: InFlight, *, resumed: bool) -> ExecStatus:
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
        with trio.move_on_after(RECORD_WAIT_S):
            return await self._wait_terminal(flight)
        logger.error(
            "execution %s: %s not recorded within %g s (is the database failing?)",
            flight.id,
            status,
            RECORD_WAIT_S,
        )
        return status

    async def _wait_terminal(self, flight: InFlight) -> ExecStatus:
        while flight.status is None:
            await flight.wait_poked()
        return flight.status

    def _build_run(self, run: TaskContext, planned: PlannedExecution) -> pb.Run:
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

    def statistics(self) -> FollowerStatistics:
        slots = self._slots.statistics()
        return FollowerStatistics(
            in_flight=len(self._in_flight),
            running_limit=int(slots.total_tokens),
            waiting_for_slot=slots.tasks_waiting,
        )
