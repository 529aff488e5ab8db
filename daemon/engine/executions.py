"""One running task's executions in flight: each host's current one, from dispatch to its
recorded end, deciding it where the agent cannot.

Who ends an execution, and when (the timers are in ``engine.timers``):
- the agent, with its result (exit, signal, its own enforcement of the command timeout);
- offline at dispatch: ``dispatch_failed`` / ``agent_offline``, or after the delivery timeout,
  ``dispatch_failed`` / ``delivery_timeout``;
- agent gone mid-run and not back within the grace: ``failed`` / ``agent_lost`` (``daemon_restart``
  when the daemon restarted and the agent never came back); back in time, its journal delivers
  the real result and nothing runs twice;
- agent connected but silent past its backstop: a cancel is sent, then ``timed_out`` is recorded
  without its word;
- the user's cancel: a cancel to the agent; ``cancelled`` once the agent confirms the kill, or
  after kill grace + margin without confirmation;
- an administrator revoking the host (``Dispatcher.fail_host``).
Every decision goes into the task's ``Outbox`` as a conditional write; an execution is over only
when a committed value says so (``on_transition``), so when an agent's result and a daemon
decision race, what was recorded wins. Ended flights wait in ``take_ended`` for the task to move
their hosts on.

When an agent comes back, what is in flight on it is reconciled with what it says it holds: a run
that never reached it is sent again; one it started but no longer knows (its state directory was
lost) is recorded as lost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from daemon.engine.fleet import AgentSession, Fleet
from daemon.engine.flight import Flight, Host, Phase, TaskState
from daemon.engine.inbox import Inbox, Outbox
from daemon.engine.slots import ExecutionSlots
from daemon.engine.timers import RECORD_WAIT_S, Deadlines, Timer
from daemon.states import ExecStatus, Reason
from daemon.store.task_records import PlannedExecution
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

NOT_STARTED = "cancelled before it started"
_RESUMABLE = frozenset({ExecStatus.DISPATCHED, ExecStatus.RUNNING})


@dataclass(frozen=True)
class ExecutionLimits:
    """The daemon's settings every running task shares."""

    agent_grace_s: float
    kill_grace_s: float
    report_margin_s: float
    max_output_bytes: int


class Executions:
    def __init__(
        self,
        task: TaskState,
        *,
        inbox: Inbox,
        outbox: Outbox,
        fleet: Fleet,
        slots: ExecutionSlots,
        limits: ExecutionLimits,
    ) -> None:
        self._task = task
        self._inbox = inbox
        self._outbox = outbox
        self._fleet = fleet
        self._slots = slots
        self._limits = limits
        self._by_id: dict[int, Flight] = {}
        self._by_host: dict[str, Flight] = {}
        self._deadlines: Deadlines[Flight] = Deadlines()
        self._ended: list[tuple[Flight, ExecStatus]] = []

    # ------------------------------------------------------------------ what the task asks

    def __len__(self) -> int:
        return len(self._by_id)

    def holds(self, execution_id: int) -> bool:
        return execution_id in self._by_id

    def on_host(self, host_id: str) -> bool:
        return host_id in self._by_host

    def unsettled_on(self, host_id: str) -> list[int]:
        flight = self._by_host.get(host_id)
        return [flight.id] if flight is not None and flight.phase is not Phase.SETTLING else []

    def next_deadline(self) -> float:
        return self._deadlines.next_at()

    def take_ended(self) -> list[tuple[Flight, ExecStatus]]:
        ended, self._ended = self._ended, []
        return ended

    def begin(self, planned: PlannedExecution, host: Host) -> None:
        """``planned`` is now ``host``'s current execution."""
        flight = Flight(planned, host, self._inbox)
        self._by_id[flight.id] = flight
        self._by_host[host.host_id] = flight
        plan = self._task.loaded
        if planned.status in _RESUMABLE:
            self._resume(flight)
        elif self._fleet.is_connected(host.host_id):
            self._want_slot(flight)
        elif plan.delivery_timeout_s > 0:
            flight.phase = Phase.AWAIT_AGENT
            self._set_timer(flight, Timer.DELIVERY, plan.delivery_timeout_s)
        else:
            message = "the agent was not connected"
            self._settle(flight, ExecStatus.DISPATCH_FAILED, Reason.AGENT_OFFLINE, message)

    def cancel_all(self) -> None:
        """The user's cancel: stop what runs, end what was not sent."""
        for flight in list(self._by_id.values()):
            if flight.phase in (Phase.AWAIT_AGENT, Phase.AWAIT_SLOT):
                self._settle(flight, ExecStatus.CANCELLED, Reason.USER_CANCEL, NOT_STARTED)
            elif flight.phase is Phase.IN_FLIGHT:
                unconfirmed = "cancelled; the agent did not confirm the kill"
                self._stop(flight, Reason.USER_CANCEL, unconfirmed)

    # ------------------------------------------------------------------ what happened

    def on_transition(self, execution_id: int, status: ExecStatus) -> None:
        flight = self._by_id.get(execution_id)
        if flight is None:
            return
        if status.terminal:
            self._end(flight, status)
        elif status == ExecStatus.RUNNING:
            flight.started = True

    def on_arrived(self, session: AgentSession) -> None:
        flight = self._by_host.get(session.host_id)
        if flight is None or self._fleet.current(session.host_id) is not session:
            return  # nothing here for it, or already replaced by a newer stream
        if flight.phase is Phase.AWAIT_AGENT:
            self._want_slot(flight)
        elif flight.phase is Phase.IN_FLIGHT:
            if flight.timer is Timer.GRACE:
                self._set_timer_at(flight, Timer.BACKSTOP, flight.report_by)
            self._reconcile(flight, session)

    def on_left(self, host_id: str) -> None:
        flight = self._by_host.get(host_id)
        if flight is None or self._fleet.is_connected(host_id):
            return
        if flight.phase is Phase.IN_FLIGHT and flight.timer is not Timer.GRACE:
            self._set_timer(flight, Timer.GRACE, self._limits.agent_grace_s)

    def on_slot(self, flight: Flight) -> None:
        """A daemon-wide slot was handed over; a flight that stopped waiting meanwhile keeps it
        until its end is recorded, like any other."""
        if flight.phase is Phase.AWAIT_SLOT:
            self._dispatch(flight)

    def expire(self, now: float) -> None:
        for flight in self._deadlines.pop_due(now):
            self._expired(flight)

    # ------------------------------------------------------------------ the steps

    def _want_slot(self, flight: Flight) -> None:
        self._clear_timer(flight)
        flight.phase = Phase.AWAIT_SLOT
        if self._slots.take_or_wait(flight):
            flight.holds_slot = True
            self._dispatch(flight)

    def _dispatch(self, flight: Flight) -> None:
        """The flight holds a daemon-wide slot: send it, unless that is no longer wanted."""
        task = self._task
        if task.stop_reason is not None:
            message = "not started: too many hosts failed"
            self._settle(flight, ExecStatus.CANCELLED, task.stop_reason, message)
            return
        if task.user_cancelled:
            self._settle(flight, ExecStatus.CANCELLED, Reason.USER_CANCEL, NOT_STARTED)
            return
        session = self._fleet.current(flight.host.host_id)
        if session is None:  # left while this execution waited for a slot
            message = "the agent went offline before dispatch"
            self._settle(flight, ExecStatus.DISPATCH_FAILED, Reason.AGENT_OFFLINE, message)
            return
        flight.run = self._build_run(flight.planned)
        flight.phase = Phase.IN_FLIGHT
        flight.report_by = trio.current_time() + self._backstop_s(flight)
        self._set_timer_at(flight, Timer.BACKSTOP, flight.report_by)
        self._outbox.dispatches.append((session, flight.run))

    def _resume(self, flight: Flight) -> None:
        """An execution in flight when the daemon stopped: its agent's journal tells the end."""
        flight.resumed = True
        flight.run = self._build_run(flight.planned)
        flight.started = flight.planned.status == ExecStatus.RUNNING
        flight.phase = Phase.IN_FLIGHT
        flight.report_by = trio.current_time() + self._backstop_s(flight)
        session = self._fleet.current(flight.host.host_id)
        if session is None:
            self._set_timer(flight, Timer.GRACE, self._limits.agent_grace_s)
        else:  # it came back before this task was resumed
            self._set_timer_at(flight, Timer.BACKSTOP, flight.report_by)
            self._reconcile(flight, session)

    def _backstop_s(self, flight: Flight) -> float:
        assert flight.run is not None
        limits = self._limits
        backstop = flight.run.timeout_ms / 1000 + limits.kill_grace_s + limits.report_margin_s
        return backstop + (limits.agent_grace_s if flight.resumed else 0.0)

    def _reconcile(self, flight: Flight, session: AgentSession) -> None:
        """Send again what never reached the agent; record as lost what it forgot it started."""
        if flight.run is None or flight.id in session.known_ids:
            return  # not dispatched yet, or held by the agent (its journal replays it)
        if flight.started:
            message = (
                "the agent came back without any record of this execution "
                "(its state directory was lost)"
            )
            self._settle(flight, ExecStatus.FAILED, Reason.AGENT_LOST, message)
        else:
            self._outbox.resends.append((session, flight.run))

    def _stop(self, flight: Flight, reason: Reason, unconfirmed: str) -> None:
        """Have the agent kill the execution; record it ourselves if it does not confirm."""
        flight.phase = Phase.STOPPING
        flight.stop = (reason, unconfirmed)
        self._outbox.cancel_notes.setdefault(reason, []).append(flight.id)
        session = self._fleet.current(flight.host.host_id)
        if session is not None:
            self._outbox.cancels.append((session, flight.id))
        limits = self._limits
        self._set_timer(flight, Timer.KILL_CONFIRM, limits.kill_grace_s + limits.report_margin_s)

    def _settle(self, flight: Flight, status: ExecStatus, reason: Reason, message: str) -> None:
        flight.phase = Phase.SETTLING
        flight.decided = status
        self._outbox.settle([flight.id], status, reason, message)
        self._set_timer(flight, Timer.RECORD, RECORD_WAIT_S)

    def _end(self, flight: Flight, status: ExecStatus) -> None:
        """The execution's end is recorded: free what it held."""
        self._clear_timer(flight)
        flight.phase = Phase.ENDED
        del self._by_id[flight.id]
        del self._by_host[flight.host.host_id]
        if flight.holds_slot:
            flight.holds_slot = False
            self._slots.release()
        self._ended.append((flight, status))

    def _expired(self, flight: Flight) -> None:
        timer, flight.timer = flight.timer, None
        host_id = flight.host.host_id
        limits = self._limits
        if timer is Timer.DELIVERY:
            message = f"the agent did not connect within {self._task.loaded.delivery_timeout_s:g} s"
            self._settle(flight, ExecStatus.DISPATCH_FAILED, Reason.DELIVERY_TIMEOUT, message)
        elif timer is Timer.GRACE:
            if self._fleet.is_connected(host_id):
                self._set_timer_at(flight, Timer.BACKSTOP, flight.report_by)
                return
            reason = Reason.DAEMON_RESTART if flight.resumed else Reason.AGENT_LOST
            message = (
                f"the agent was gone for {limits.agent_grace_s:g} s and did not report this "
                "execution"
            )
            self._settle(flight, ExecStatus.FAILED, reason, message)
        elif timer is Timer.BACKSTOP:
            if not self._fleet.is_connected(host_id):
                self._set_timer(flight, Timer.GRACE, limits.agent_grace_s)
                return
            self._stop(flight, Reason.TIMEOUT, "timed out; the agent did not confirm the kill")
        elif timer is Timer.KILL_CONFIRM:
            assert flight.stop is not None
            reason, unconfirmed = flight.stop
            status = ExecStatus.TIMED_OUT if reason == Reason.TIMEOUT else ExecStatus.CANCELLED
            self._settle(flight, status, reason, unconfirmed)
        elif timer is Timer.RECORD:
            assert flight.decided is not None
            logger.error(
                "execution %s: %s not recorded within %g s (is the database failing?)",
                flight.id,
                flight.decided,
                RECORD_WAIT_S,
            )
            self._end(flight, flight.decided)

    def _set_timer(self, flight: Flight, timer: Timer, after_s: float) -> None:
        self._set_timer_at(flight, timer, trio.current_time() + after_s)

    def _set_timer_at(self, flight: Flight, timer: Timer, at: float) -> None:
        flight.timer = timer
        self._deadlines.set(flight, at)

    def _clear_timer(self, flight: Flight) -> None:
        flight.timer = None
        self._deadlines.clear(flight)

    def _build_run(self, planned: PlannedExecution) -> pb.Run:
        command = self._task.loaded.commands[planned.command_index]
        return pb.Run(
            command_host_id=planned.id,
            task_id=self._task.task_id,
            script=command.script,
            args=list(command.args),
            env=dict(command.env),
            cwd=command.cwd,
            timeout_ms=int(command.timeout_s * 1000),
            output_limit_bytes=self._limits.max_output_bytes,
            kill_grace_ms=int(self._limits.kill_grace_s * 1000),
        )
