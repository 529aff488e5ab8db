"""Where one running task stands: the whole task (``TaskState``), each host (``Host``) and each
host's current execution (``Flight``, in one ``Phase`` at a time).

``engine.task_run`` walks the hosts, ``engine.executions`` moves the flights; both read the one
``TaskState``. ``engine.timers`` says which timer a flight holds in which phase.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from daemon.engine.inbox import Inbox, SlotGranted
from daemon.engine.timers import Timer
from daemon.states import ExecStatus, Reason
from daemon.store.task_records import PlannedExecution, TaskPlan
from proto.dispatch import v1 as pb


@dataclass(eq=False)
class TaskState:
    task_id: int
    plan: TaskPlan | None = None  # once read from the record
    user_cancelled: bool = False
    stop_reason: Reason | None = None  # set once no new execution may start
    failed_hosts: int = 0

    @property
    def loaded(self) -> TaskPlan:
        assert self.plan is not None, "the task's plan is read before any host starts"
        return self.plan

    @property
    def stopping(self) -> bool:
        """Nothing new starts: the user cancelled, or too many hosts failed."""
        return self.user_cancelled or self.stop_reason is not None


class Phase(enum.Enum):
    AWAIT_AGENT = "await_agent"  # the host is offline; waiting up to the delivery timeout
    AWAIT_SLOT = "await_slot"  # connected; waiting for a daemon-wide slot
    IN_FLIGHT = "in_flight"  # sent to the agent (or resumed); waiting for its word
    STOPPING = "stopping"  # a cancel was sent; waiting for the agent to confirm the kill
    SETTLING = "settling"  # the daemon decided the end; waiting for it to be recorded
    ENDED = "ended"  # its end is recorded


@dataclass(eq=False, slots=True)
class Host:
    host_id: str
    remaining: deque[PlannedExecution]  # in command order; [0] is the current one once active
    holds_task_slot: bool = False


@dataclass(eq=False, slots=True)
class Flight:
    planned: PlannedExecution
    host: Host
    inbox: Inbox  # its task's: where a daemon-wide slot is handed over
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
        self.inbox.put(SlotGranted(self))
