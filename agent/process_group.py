"""Process groups: how the agent stops a command together with everything it started.

Where the agent has cgroups (``agent.cgroups``), the command's cgroup is signalled together with
its group, which also reaches what left the session; without, the group is all there is.

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

from agent.cgroups import CommandCgroup

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


@dataclass(frozen=True, slots=True)
class KillReport:
    """How a kill went: ``result``, whether the process group still existed when it began
    (``group``), and how many members of the command's cgroup were outside the group then
    (``escaped``: what a process-group kill alone would have missed)."""

    result: KillResult
    group: bool = True
    escaped: int = 0

    def describe(self, grace_s: float) -> str:
        if self.result is KillResult.ALREADY_GONE:
            return self.result.describe(grace_s)
        how = (
            "SIGTERM"
            if self.result is KillResult.TERMINATED
            else (f"SIGTERM, then SIGKILL after {grace_s:.1f} s")
        )
        others = f"{self.escaped} process{'es' if self.escaped != 1 else ''}"
        if not self.group:
            return (
                f"the process group had already exited; {others} left in the command's "
                f"cgroup killed ({how})"
            )
        text = f"process group killed ({how})"
        if self.escaped:
            text += f", and {others} that had left it, through the command's cgroup"
        return text


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


async def kill_process_group(
    pgid: int | None,
    *,
    grace_s: float,
    cgroup: CommandCgroup | None = None,
    reap_timeout_s: float = 5.0,
) -> KillReport:
    """SIGTERM the group (and every member of ``cgroup``), wait up to ``grace_s`` while any of
    them lives, then SIGKILL the group and ``cgroup.kill`` the cgroup.

    ``pgid`` None: the group is not (or no longer provably) the command's; only the cgroup is
    signalled. A zombie leader still counts as a member of its group: whoever spawned it must
    reap it concurrently (the runner does) or this always waits the full grace. After SIGKILL it
    waits up to ``reap_timeout_s`` for the cgroup to empty, so the caller can remove it.
    """
    # Counted before any signal: a process that died is in no group any more.
    outside = [pid for pid in cgroup.pids() if _group_of(pid) != pgid] if cgroup else []
    group = pgid is not None and signal_group(pgid, signal.SIGTERM)
    escaped = len(cgroup.signal(signal.SIGTERM)) if cgroup is not None and not group else 0
    if cgroup is not None and group:
        cgroup.signal(signal.SIGTERM)
        escaped = len(outside)
    if not group and not escaped:
        return KillReport(KillResult.ALREADY_GONE, group=False)
    with trio.move_on_after(grace_s):
        # The kernel has no notification for "this group is empty": poll it. With a cgroup, its
        # ``populated`` is the exact answer: every member of the group is in it, and unlike the
        # group it does not count zombies (an orphan waiting for a slow init to reap it).
        while _alive(pgid if group else None, cgroup):  # noqa: ASYNC110
            await trio.sleep(_POLL_S)
        return KillReport(KillResult.TERMINATED, group=group, escaped=escaped)
    if cgroup is not None:
        cgroup.kill()
    # Only a group that exists still has its id allocated to it: never signal a reused one.
    if group and pgid is not None and group_exists(pgid):
        signal_group(pgid, signal.SIGKILL)
    if cgroup is not None:
        with trio.move_on_after(reap_timeout_s):
            while cgroup.populated():  # noqa: ASYNC110 (cgroup.events has no trio wake-up)
                await trio.sleep(_POLL_S)
    return KillReport(KillResult.KILLED, group=group, escaped=escaped)


def _alive(pgid: int | None, cgroup: CommandCgroup | None) -> bool:
    if cgroup is not None:
        return cgroup.populated()
    return pgid is not None and group_has_live_members(pgid)


def group_has_live_members(pgid: int) -> bool:
    """Whether a process of the group is still alive (not a zombie).

    ``killpg(pgid, 0)`` also succeeds for zombies: an orphan of the command waits as one until
    init reaps it, which a container's init may do late or never. So this reads procfs (kernel
    memory, no disk): one small file per process on the machine, only while a kill waits.
    """
    if not group_exists(pgid):
        return False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _safe_to_signal(pgid: int) -> bool:
    # killpg(0) and killpg(1) would hit the agent's own group or every process it may signal.
    return pgid > 1 and pgid != os.getpgrp()
