"""Process groups: how the agent stops a command together with everything it started.

Every command runs as the leader of its own session, so its process group id equals its pid and
``killpg`` reaches the background jobs it spawned too (trio's default cancel signals only the
direct child). What the journal records about a running command is a ``ProcessInfo``, enough to
find the group again after an agent restart without ever signalling a stranger that reused the pid.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from dataclasses import dataclass

import trio

logger = logging.getLogger(__name__)

_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    pgid: int
    # Field 22 of /proc/<pid>/stat (clock ticks after boot); 0 when it could not be read.
    start_time: int


class KillResult(enum.Enum):
    ALREADY_GONE = "the process group had already exited"
    TERMINATED = "process group killed (SIGTERM)"
    KILLED = "process group killed (SIGTERM, then SIGKILL after {grace:.1f} s)"

    def describe(self, grace_s: float) -> str:
        return self.value.format(grace=grace_s)


def read_start_time(pid: int) -> int:
    """The process's start time from procfs, or 0 when it is gone or unreadable.

    procfs is served from kernel memory, so this read never waits on a disk.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return 0
    # The command name (field 2) may hold spaces and parentheses: split after its closing one.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall; the list starts at field 3
    except (IndexError, ValueError):
        return 0


def describe_process(pid: int) -> ProcessInfo:
    """What to journal about a freshly spawned session leader."""
    return ProcessInfo(pid=pid, pgid=pid, start_time=read_start_time(pid))


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_still_ours(info: ProcessInfo) -> bool:
    """Whether the group of a command recorded before an agent restart is still that command's.

    When the leader still runs, its start time must match, or the pid was reused. When the leader
    is gone, a group with that id can only be the old one: the kernel does not hand out a number
    still used as a process group id, so nobody else can have become leader of group ``pgid``.
    """
    if not _safe_to_signal(info.pgid):
        return False
    current = read_start_time(info.pid)
    if current:
        return info.start_time != 0 and current == info.start_time
    return group_exists(info.pgid)


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to the group; False when the group no longer exists."""
    if not _safe_to_signal(pgid):
        raise ValueError(f"refusing to signal process group {pgid}")
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Every member left is someone else's (a setuid program): nothing more we can do.
        logger.warning("process group %d: not permitted to send signal %d", pgid, signum)
    return True


async def kill_process_group(pgid: int, *, grace_s: float) -> KillResult:
    """SIGTERM the group, wait up to ``grace_s`` while it has members, then SIGKILL it.

    A zombie leader still counts as a member: whoever spawned it must reap it concurrently (the
    runner does) or this always waits the full grace.
    """
    if not signal_group(pgid, signal.SIGTERM):
        return KillResult.ALREADY_GONE
    with trio.move_on_after(grace_s):
        # The kernel has no notification for "this group is empty": poll it.
        while group_exists(pgid):  # noqa: ASYNC110
            await trio.sleep(_POLL_S)
        return KillResult.TERMINATED
    # Checked just above: the group existed a moment ago, so its id is still allocated to it.
    if not signal_group(pgid, signal.SIGKILL):
        return KillResult.TERMINATED
    return KillResult.KILLED


def _safe_to_signal(pgid: int) -> bool:
    # killpg(0) and killpg(1) would hit the agent's own group or every process it may signal.
    return pgid > 1 and pgid != os.getpgrp()
