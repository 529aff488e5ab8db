"""The states a task and each CommandHost pass through, and the reasons a terminal state carries.

CommandHost: pending -> dispatched -> running -> succeeded | failed | timed_out | cancelled,
plus dispatch_failed (never reached the agent) and skipped (an earlier command on that host
failed). Task: pending -> queued -> running -> completed | failed | cancelled.
Terminal states never change again; writes are conditional on the state being non-terminal.
"""

from __future__ import annotations

from enum import StrEnum


class ExecStatus(StrEnum):
    PENDING = "pending"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    DISPATCH_FAILED = "dispatch_failed"
    SKIPPED = "skipped"

    @property
    def terminal(self) -> bool:
        return self in EXEC_TERMINAL


EXEC_TERMINAL = frozenset(
    {
        ExecStatus.SUCCEEDED,
        ExecStatus.FAILED,
        ExecStatus.TIMED_OUT,
        ExecStatus.CANCELLED,
        ExecStatus.DISPATCH_FAILED,
        ExecStatus.SKIPPED,
    }
)
# The order a status may move in: a write never moves a CommandHost backwards.
EXEC_RANK = {
    ExecStatus.PENDING: 0,
    ExecStatus.DISPATCHED: 1,
    ExecStatus.RUNNING: 2,
    **{status: 3 for status in EXEC_TERMINAL},
}


class TaskStatus(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TASK_TERMINAL


TASK_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


class Reason(StrEnum):
    """Why a CommandHost ended where it did (machine-readable; a message says it for people)."""

    EXIT_ZERO = "exit_zero"
    EXIT_NONZERO = "exit_nonzero"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    USER_CANCEL = "user_cancel"
    ERROR_THRESHOLD = "error_threshold"
    AGENT_OFFLINE = "agent_offline"
    DELIVERY_TIMEOUT = "delivery_timeout"
    AGENT_LOST = "agent_lost"
    AGENT_RESTART = "agent_restart"
    DAEMON_RESTART = "daemon_restart"
    SPAWN_ERROR = "spawn_error"
    PREVIOUS_FAILED = "previous_failed"
    DAEMON_SHUTDOWN = "daemon_shutdown"
    INTERNAL_ERROR = "internal_error"
    AGENT_ERROR = "agent_error"
    HOST_REVOKED = "host_revoked"  # an administrator revoked the host while it ran


class HostStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class EnrollmentState(StrEnum):
    """Whether a host may run anything: only ``approved`` hosts connect and are targeted.

    pending -> approved | rejected; approved -> revoked; rejected | revoked -> approved."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    REVOKED = "revoked"
