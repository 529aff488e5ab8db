"""Running one task: one state machine, in one trio task, that owns all its hosts' progress.

Hosts are launched in target order; with ``max_concurrency`` only that many are active at once.
An active host walks its commands one after another; a host that fails skips the rest of its
commands unless the task says ``continue_on_error``. Past ``max_failures`` failed hosts nothing
new starts: what has not started ends ``cancelled`` / ``error_threshold``. The user's cancel
reaches every execution in flight and ends the rest ``cancelled`` before they start. When every
host is done the task ends ``completed`` (every execution succeeded), ``cancelled`` (by the user)
or ``failed``. A daemon shutdown records none of this: the task stays running and is resumed on
restart, from what the database says (``store.task_records.load_plan``).

Who ends an execution, and when:
- the agent, with its result (exit, signal, its own enforcement of the command timeout);
- offline at dispatch: ``dispatch_failed`` / ``agent_offline``, or after ``delivery_timeout_s``
  of waiting, ``dispatch_failed`` / ``delivery_timeout``;
- agent gone mid-run and not back within ``agent_grace_s``: ``failed`` / ``agent_lost``
  (``daemon_restart`` when the daemon restarted and the agent never came back); back in time,
  its journal delivers the real result and nothing runs twice;
- agent connected but silent past its backstop: a cancel is sent, then ``timed_out`` is
  recorded without its word;
- the user's cancel: a cancel to the agent; ``cancelled`` once the agent confirms the kill, or
  after kill grace + margin without confirmation;
- an administrator revoking the host (``Dispatcher.fail_host``).
Every decision is a conditional write through the writer; an execution is over when a committed
value (``store.commits``) says so, so when an agent's result and a daemon decision race, the
machine acts on the one that was recorded. The timers are in ``engine.timers``.

When an agent comes back, what is in flight on it is reconciled with what it says it holds: a
run that never reached it is sent again; one it started but no longer knows (its state directory
was lost) is recorded as lost.

The machine wakes for what its inbox brings (committed transitions of its executions, agents
arriving and leaving, a daemon-wide slot handed over, the user's cancel) and for its next
deadline; each wake-up decides synchronously, then hands the writer and the agents what it
decided, in that order (a run leaves only after its ``dispatched`` mark is queued).
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from daemon.engine.fleet import AgentSession, Fleet
from daemon.engine.records import TaskRecords
from daemon.engine.slots import ExecutionSlots
from daemon.engine.timers import RECORD_WAIT_S, Deadlines, Timer
from daemon.states import ExecStatus, Reason, TaskStatus
from daemon.store.task_records import PlannedExecution, TaskPlan
from daemon.store.writer import Writer
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

_RESUMABLE = frozenset({ExecStatus.DISPATCHED, ExecStatus.RUNNING})
_NOT_STARTED = "cancelled before it started"


@dataclass(frozen=True)
class ExecutionLimits:
    """The daemon's settings every running task shares."""

    agent_grace_s: float
    kill_grace_s: float
    report_margin_s: float
    max_output_bytes: int


class Phase(enum.Enum):
    AWAIT_AGENT = "await_agent"  # the host is offline; waiting up to the delivery timeout
    AWAIT_SLOT = "await_slot"  # connected; waiting for a daemon-wide slot
    IN_FLIGHT = "in_flight"  # sent to the agent (or resumed); waiting for its word
    STOPPING = "stopping"  # a cancel was sent; waiting for the agent to confirm the kill
    SETTLING = "settling"  # the daemon decided the end; waiting for it to be recorded


@dataclass(eq=False, slots=True)
class Host:
    host_id: str
    remaining: deque[PlannedExecution]  # in command order; [0] is the current one once active
    holds_task_slot: bool = False


@dataclass(eq=False, slots=True)
class Flight:
    """The current execution of an active host."""

    planned: PlannedExecution
    host: Host
    owner: TaskRun
    phase: Phase = Phase.AWAIT_AGENT
    run: pb.Run | None = None  # once dispatched: kept to send again after a reconnect
    started: bool = False
    resumed: bool = False
    holds_slot: bool = False
    report_by: float = 0.0  # the backstop, on trio's clock
    timer: Timer | None = None
    stop: tuple[Reason, str] | None = None  # while STOPPING: why, and the message if unconfirmed
    decided: ExecStatus | None = None  # while SETTLING: what the daemon recorded

    @property
    def id(self) -> int:
        return self.planned.id

    def wants_slot(self) -> bool:
        return self.phase is Phase.AWAIT_SLOT and not self.holds_slot

    def grant_slot(self) -> None:
        self.holds_slot = True
        self.owner.inbox.put(SlotGranted(self))


# --- what wakes a task ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    execution_id: int
    status: ExecStatus


@dataclass(frozen=True, slots=True)
class AgentArrived:
    session: AgentSession


@dataclass(frozen=True, slots=True)
class AgentLeft:
    host_id: str


@dataclass(frozen=True, slots=True)
class SlotGranted:
    flight: Flight


@dataclass(frozen=True, slots=True)
class CancelRequested:
    pass


Message = Transition | AgentArrived | AgentLeft | SlotGranted | CancelRequested


class Inbox:
    """What happened since the task last looked; never blocks the sender. Bounded by the work
    in flight: each execution yields a few transitions, each agent an arrival or a departure."""

    def __init__(self) -> None:
        self._items: list[Message] = []
        self._ready = trio.Event()

    def put(self, message: Message) -> None:
        self._items.append(message)
        self._ready.set()

    def put_all(self, messages: Sequence[Message]) -> None:
        if messages:
            self._items.extend(messages)
            self._ready.set()

    async def wait(self) -> None:
        await self._ready.wait()

    def take(self) -> list[Message]:
        items, self._items = self._items, []
        self._ready = trio.Event()
        return items


@dataclass
class _Outbox:
    """What one wake-up decided, handed out together after it."""

    settles: dict[tuple[ExecStatus, Reason, str], list[int]] = field(default_factory=dict)
    cancel_notes: dict[Reason, list[int]] = field(default_factory=dict)
    cancels: list[tuple[AgentSession, int]] = field(default_factory=list)
    dispatches: list[tuple[AgentSession, pb.Run]] = field(default_factory=list)
    resends: list[tuple[AgentSession, pb.Run]] = field(default_factory=list)

    def settle(self, ids: Sequence[int], status: ExecStatus, reason: Reason, message: str) -> None:
        if ids:
            self.settles.setdefault((status, reason, message), []).extend(ids)


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
        self.flights: dict[int, Flight] = {}  # the current execution of each active host
        self._writer = writer
        self._records = records
        self._fleet = fleet
        self._slots = slots
        self._limits = limits
        self._plan: TaskPlan | None = None
        self._waiting: deque[Host] = deque()  # not launched yet, in target order
        self._active: dict[str, Host] = {}
        self._task_slots_free: float = float("inf")
        self._deadlines: Deadlines[Flight] = Deadlines()
        self._outbox = _Outbox()
        self.user_cancelled = False
        self.stop_reason: Reason | None = None  # set once no new execution may start
        self.failed_hosts = 0

    # ------------------------------------------------------------------ for the dispatcher

    def holds(self, execution_id: int) -> bool:
        return execution_id in self.flights

    def active_on(self, host_id: str) -> bool:
        return host_id in self._active

    def unsettled_on(self, host_id: str) -> list[int]:
        host = self._active.get(host_id)
        if host is None or not host.remaining:
            return []
        flight = self.flights.get(host.remaining[0].id)
        return [flight.id] if flight is not None and flight.phase is not Phase.SETTLING else []

    # ------------------------------------------------------------------ the run

    async def run(self) -> TaskStatus | None:
        """Run (or resume) a queued or running task to its end; returns its final status."""
        plan = await self._records.load_plan(self.task_id)
        if plan is None or plan.status not in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            return None
        self._plan = plan
        if plan.cancel_requested:
            self.user_cancelled = True
        started = await self._writer.change_task(
            self.task_id,
            TaskStatus.RUNNING,
            frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING}),
            started_at=plan.started_at or time.time(),
        )
        if not started:
            return None  # cancelled while it waited in the queue
        if plan.max_concurrency is not None:
            self._task_slots_free = plan.max_concurrency
        resumed = plan.status == TaskStatus.RUNNING
        logger.info(
            "task %s %s: %d hosts, %d commands",
            self.task_id,
            "resumed" if resumed else "started",
            len(plan.by_host),
            len(plan.commands),
        )
        self._waiting = deque(
            Host(host_id, deque(executions)) for host_id, executions in plan.by_host.items()
        )
        if self.user_cancelled:
            self._cancel()
        self._launch()
        await self._hand_out()
        while self._waiting or self._active:
            with trio.move_on_at(self._deadlines.next_at()):
                await self.inbox.wait()
            for message in self.inbox.take():
                self._handle(message)
            for flight in self._deadlines.pop_due(trio.current_time()):
                self._expired(flight)
            self._launch()
            await self._hand_out()
        return await self._finish()

    async def _finish(self) -> TaskStatus:
        counts = await self._records.status_counts(self.task_id)
        unfinished = [s for s in counts if not s.terminal]
        if unfinished:  # a bug if it happens; never leave an execution running forever
            logger.error("task %s ended with executions still %s", self.task_id, unfinished)
        total = sum(counts.values())
        succeeded = counts.get(ExecStatus.SUCCEEDED, 0)
        error: str | None
        if self.user_cancelled:
            final, error = TaskStatus.CANCELLED, "cancelled by user"
        elif succeeded == total:
            final, error = TaskStatus.COMPLETED, None
        else:
            final = TaskStatus.FAILED
            error = f"{total - succeeded} of {total} executions did not succeed"
            if self.stop_reason == Reason.ERROR_THRESHOLD:
                error += f"; stopped after {self.failed_hosts} hosts failed"
        await self._writer.change_task(
            self.task_id, final, frozenset({TaskStatus.RUNNING}),
            finished_at=time.time(), error=error,
        )  # fmt: skip
        logger.info("task %s %s (%d/%d succeeded)", self.task_id, final, succeeded, total)
        return final

    async def _hand_out(self) -> None:
        """Give the writer and the agents what this wake-up decided: cancel reasons before the
        cancels, the ``dispatched`` marks before the runs."""
        out, self._outbox = self._outbox, _Outbox()
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
        while self._waiting and self.stop_reason is None and not self.user_cancelled:
            host = self._waiting[0]
            needs_slot = not all(e.status.terminal for e in host.remaining)
            if needs_slot and self._plan is not None and self._plan.max_concurrency is not None:
                if self._task_slots_free <= 0:
                    return
                self._task_slots_free -= 1
                host.holds_task_slot = True
            self._waiting.popleft()
            self._active[host.host_id] = host
            self._advance(host)
        if self._waiting:  # nothing more starts: too many hosts failed, or the user cancelled
            unstarted = [e.id for host in self._waiting for e in host.remaining]
            self._waiting.clear()
            self._end_unstarted(unstarted)

    def _advance(self, host: Host) -> None:
        """Start the host's next command, or finish the host."""
        while host.remaining:
            planned = host.remaining[0]
            if planned.status.terminal:  # resumed after a restart: already over
                host.remaining.popleft()
                if not self._after(host, planned, planned.status):
                    return
                continue
            if self.stop_reason is not None or self.user_cancelled:
                self._end_unstarted([e.id for e in host.remaining])
                host.remaining.clear()
                break
            self._begin(Flight(planned, host, self))
            return
        self._host_done(host)

    def _after(self, host: Host, planned: PlannedExecution, status: ExecStatus) -> bool:
        """Count the end of one of the host's executions; False if the host is done."""
        if status in (ExecStatus.SUCCEEDED, ExecStatus.CANCELLED):
            return True
        self._host_failed()
        if self._plan is not None and not self._plan.continue_on_error:
            self._outbox.settle(
                [e.id for e in host.remaining], ExecStatus.SKIPPED, Reason.PREVIOUS_FAILED,
                f"skipped: command {planned.command_index} did not succeed on this host",
            )  # fmt: skip
            host.remaining.clear()
            self._host_done(host)
            return False
        return True

    def _host_done(self, host: Host) -> None:
        self._active.pop(host.host_id, None)
        if host.holds_task_slot:
            host.holds_task_slot = False
            self._task_slots_free += 1

    def _host_failed(self) -> None:
        self.failed_hosts += 1
        limit = self._plan.max_failures if self._plan is not None else None
        if limit is not None and self.failed_hosts > limit and self.stop_reason is None:
            self.stop_reason = Reason.ERROR_THRESHOLD
            logger.info(
                "task %s: %d hosts failed (more than %d); nothing new starts",
                self.task_id,
                self.failed_hosts,
                limit,
            )

    def _end_unstarted(self, ids: list[int]) -> None:
        """End executions that will never start: the user cancelled, or too many hosts failed."""
        if self.user_cancelled:
            self._outbox.settle(ids, ExecStatus.CANCELLED, Reason.USER_CANCEL, _NOT_STARTED)
        else:
            limit = self._plan.max_failures if self._plan is not None else None
            message = f"not started: more than {limit} hosts failed"
            self._outbox.settle(ids, ExecStatus.CANCELLED, Reason.ERROR_THRESHOLD, message)

    # ------------------------------------------------------------------ one execution

    def _begin(self, flight: Flight) -> None:
        self.flights[flight.id] = flight
        if flight.planned.status in _RESUMABLE:
            self._resume(flight)
        elif self._fleet.is_connected(flight.host.host_id):
            self._want_slot(flight)
        elif self._plan is not None and self._plan.delivery_timeout_s > 0:
            flight.phase = Phase.AWAIT_AGENT
            self._set_timer(flight, Timer.DELIVERY, self._plan.delivery_timeout_s)
        else:
            self._settle(flight, ExecStatus.DISPATCH_FAILED, Reason.AGENT_OFFLINE,
                         "the agent was not connected")  # fmt: skip

    def _want_slot(self, flight: Flight) -> None:
        self._clear_timer(flight)
        flight.phase = Phase.AWAIT_SLOT
        if self._slots.take_or_wait(flight):
            flight.holds_slot = True
            self._dispatch(flight)

    def _dispatch(self, flight: Flight) -> None:
        """The flight holds a daemon-wide slot: send it, unless that is no longer wanted."""
        if self.stop_reason is not None:
            self._settle(flight, ExecStatus.CANCELLED, self.stop_reason,
                         "not started: too many hosts failed")  # fmt: skip
            return
        if self.user_cancelled:
            self._settle(flight, ExecStatus.CANCELLED, Reason.USER_CANCEL, _NOT_STARTED)
            return
        session = self._fleet.current(flight.host.host_id)
        if session is None:  # left while this execution waited for a slot
            self._settle(flight, ExecStatus.DISPATCH_FAILED, Reason.AGENT_OFFLINE,
                         "the agent went offline before dispatch")  # fmt: skip
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
            self._settle(flight, ExecStatus.FAILED, Reason.AGENT_LOST,
                         "the agent came back without any record of this execution "
                         "(its state directory was lost)")  # fmt: skip
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

    def _ended(self, flight: Flight, status: ExecStatus) -> None:
        """The execution's end is recorded: free what it held and move its host on."""
        self._clear_timer(flight)
        del self.flights[flight.id]
        if flight.holds_slot:
            flight.holds_slot = False
            self._slots.release()
        flight.phase = Phase.SETTLING  # no longer wants a slot, whatever it waited for
        host = flight.host
        host.remaining.popleft()
        if self._after(host, flight.planned, status):
            self._advance(host)

    # ------------------------------------------------------------------ what wakes it

    def _handle(self, message: Message) -> None:
        if isinstance(message, Transition):
            flight = self.flights.get(message.execution_id)
            if flight is None:
                return
            if message.status.terminal:
                self._ended(flight, message.status)
            elif message.status == ExecStatus.RUNNING:
                flight.started = True
        elif isinstance(message, AgentArrived):
            self._arrived(message.session)
        elif isinstance(message, AgentLeft):
            self._left(message.host_id)
        elif isinstance(message, SlotGranted):
            flight = message.flight
            if flight.phase is Phase.AWAIT_SLOT and flight.id in self.flights:
                self._dispatch(flight)
            elif flight.holds_slot and flight.id not in self.flights:
                flight.holds_slot = False
                self._slots.release()
        else:
            self._cancel()

    def _current(self, host_id: str) -> Flight | None:
        host = self._active.get(host_id)
        if host is None or not host.remaining:
            return None
        return self.flights.get(host.remaining[0].id)

    def _arrived(self, session: AgentSession) -> None:
        flight = self._current(session.host_id)
        if flight is None or self._fleet.current(session.host_id) is not session:
            return  # nothing here for it, or already replaced by a newer stream
        if flight.phase is Phase.AWAIT_AGENT:
            self._want_slot(flight)
        elif flight.phase is Phase.IN_FLIGHT:
            if flight.timer is Timer.GRACE:
                self._set_timer_at(flight, Timer.BACKSTOP, flight.report_by)
            self._reconcile(flight, session)

    def _left(self, host_id: str) -> None:
        flight = self._current(host_id)
        if flight is None or self._fleet.is_connected(host_id):
            return
        if flight.phase is Phase.IN_FLIGHT and flight.timer is not Timer.GRACE:
            self._set_timer(flight, Timer.GRACE, self._limits.agent_grace_s)

    def _cancel(self) -> None:
        """The user's cancel: stop what runs, end what has not started."""
        self.user_cancelled = True
        unstarted = [e.id for host in self._waiting for e in host.remaining]
        self._waiting.clear()
        for host in list(self._active.values()):
            flight = self.flights.get(host.remaining[0].id) if host.remaining else None
            later = list(host.remaining)[1:] if flight is not None else list(host.remaining)
            unstarted.extend(e.id for e in later)
            if flight is None:
                continue
            if flight.phase in (Phase.AWAIT_AGENT, Phase.AWAIT_SLOT):
                self._settle(flight, ExecStatus.CANCELLED, Reason.USER_CANCEL, _NOT_STARTED)
            elif flight.phase is Phase.IN_FLIGHT:
                self._stop(flight, Reason.USER_CANCEL,
                           "cancelled; the agent did not confirm the kill")  # fmt: skip
        self._end_unstarted(unstarted)

    def _expired(self, flight: Flight) -> None:
        timer, flight.timer = flight.timer, None
        host_id = flight.host.host_id
        if timer is Timer.DELIVERY:
            patience = self._plan.delivery_timeout_s if self._plan is not None else 0.0
            self._settle(flight, ExecStatus.DISPATCH_FAILED, Reason.DELIVERY_TIMEOUT,
                         f"the agent did not connect within {patience:g} s")  # fmt: skip
        elif timer is Timer.GRACE:
            if self._fleet.is_connected(host_id):
                self._set_timer_at(flight, Timer.BACKSTOP, flight.report_by)
                return
            reason = Reason.DAEMON_RESTART if flight.resumed else Reason.AGENT_LOST
            self._settle(flight, ExecStatus.FAILED, reason,
                         f"the agent was gone for {self._limits.agent_grace_s:g} s and did "
                         "not report this execution")  # fmt: skip
        elif timer is Timer.BACKSTOP:
            if not self._fleet.is_connected(host_id):
                self._set_timer(flight, Timer.GRACE, self._limits.agent_grace_s)
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
            self._ended(flight, flight.decided)

    def _set_timer(self, flight: Flight, timer: Timer, after_s: float) -> None:
        self._set_timer_at(flight, timer, trio.current_time() + after_s)

    def _set_timer_at(self, flight: Flight, timer: Timer, at: float) -> None:
        flight.timer = timer
        self._deadlines.set(flight, at)

    def _clear_timer(self, flight: Flight) -> None:
        flight.timer = None
        self._deadlines.clear(flight)

    def _build_run(self, planned: PlannedExecution) -> pb.Run:
        assert self._plan is not None
        command = self._plan.commands[planned.command_index]
        return pb.Run(
            command_host_id=planned.id,
            task_id=self.task_id,
            script=command.script,
            args=list(command.args),
            env=dict(command.env),
            cwd=command.cwd,
            timeout_ms=int(command.timeout_s * 1000),
            output_limit_bytes=self._limits.max_output_bytes,
            kill_grace_ms=int(self._limits.kill_grace_s * 1000),
        )
