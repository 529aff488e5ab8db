"""What an agent's event means: whether it can be applied at all, and what its Finished report
records (status, reason, message)."""

from __future__ import annotations

import signal as signals
from typing import Any

import betterproto2

from daemon.states import ExecStatus, Reason
from proto.dispatch import v1 as pb

_MAX_COLUMN = (1 << 63) - 1  # ids, offsets and byte counts are signed 64-bit columns


def malformed(event: pb.Event) -> str | None:
    """Why an agent's event cannot be applied, or None. The decoder is lenient (a field sent
    with another wire type can come out as a list or None), and every number the ledger stores
    must fit its column: anything else is refused here, before it can reach the database."""
    kind, value = betterproto2.which_one_of(event, "kind")
    numbers: dict[str, Any] = {"command_host_id": event.command_host_id, "seq": event.seq}
    if kind == "started":
        numbers["pid"] = value.pid
    elif kind == "output":
        numbers["stream"] = value.stream
        numbers["offset"] = value.offset
        if not isinstance(value.data, bytes | bytearray):
            return "output data is not bytes"
    elif kind == "finished":
        if not isinstance(value.error, str):
            return "finished error is not text"
        for name in ("exit_code", "signal", "stdout_bytes", "stderr_bytes", "duration_ns"):
            numbers[name] = getattr(value, name)
    for name, number in numbers.items():
        if not isinstance(number, int) or isinstance(number, bool):
            return f"{name} is not a number"
        if name != "exit_code" and not 0 <= number <= _MAX_COLUMN:
            return f"{name} {number} is out of range"
    if kind == "output" and value.offset + len(value.data) > _MAX_COLUMN:
        return f"output offset {value.offset} is out of range"
    return None


# ------------------------------------------------------------------ state


def outcome_of(
    finished: pb.Finished, cancel_reason: Reason | None
) -> tuple[ExecStatus, Reason, str]:
    """The recorded status, reason and default message for an agent's Finished report."""
    outcome = finished.outcome
    if outcome == pb.Outcome.EXITED:
        if finished.signal:
            return ExecStatus.FAILED, Reason.SIGNAL, f"killed by {signal_name(finished.signal)}"
        if finished.has_exit_code and finished.exit_code == 0:
            return ExecStatus.SUCCEEDED, Reason.EXIT_ZERO, ""
        if finished.has_exit_code:
            return ExecStatus.FAILED, Reason.EXIT_NONZERO, f"exited with {finished.exit_code}"
        return ExecStatus.FAILED, Reason.EXIT_NONZERO, "ended without an exit code"
    if outcome == pb.Outcome.TIMED_OUT:
        return ExecStatus.TIMED_OUT, Reason.TIMEOUT, "timed out; process group killed"
    if outcome == pb.Outcome.CANCELLED:
        if cancel_reason == Reason.TIMEOUT:
            return ExecStatus.TIMED_OUT, Reason.TIMEOUT, "timed out; process group killed"
        reason = cancel_reason or Reason.USER_CANCEL
        return ExecStatus.CANCELLED, reason, "cancelled; process group killed"
    if outcome == pb.Outcome.SPAWN_ERROR:
        return ExecStatus.FAILED, Reason.SPAWN_ERROR, "the command could not be started"
    if outcome == pb.Outcome.AGENT_RESTART:
        return ExecStatus.FAILED, Reason.AGENT_RESTART, "the agent restarted while it ran"
    # UNSPECIFIED: the agent itself failed while running the command (its error says how).
    return ExecStatus.FAILED, Reason.AGENT_ERROR, "the agent failed while running the command"


def signal_name(number: int) -> str:
    try:
        return f"signal {number} ({signals.Signals(number).name})"
    except ValueError:
        return f"signal {number}"
