"""Per-command cgroups (cgroup v2): what the agent kills that a process-group kill misses.

A command that leaves its session (``setsid``, a daemonizing double fork) escapes ``killpg``, but
not its cgroup: a process cannot leave a cgroup by itself, and ``cgroup.kill`` (Linux >= 5.14)
SIGKILLs every member at once, including one that forks meanwhile. So where the machine offers a
writable cgroup v2 hierarchy, every command runs in a cgroup of its own.

Layout, under the *parent* (``--cgroup-root``, default the agent's own cgroup, found from
``/proc/self/cgroup`` and the cgroup2 mount in ``/proc/mounts``)::

    <parent>/dispatch-agent.<host id>.<hash of the state dir>/    the agent's directory
        cmd-<command_host_id>/                                    one per command

Lifecycle of ``cmd-N``:
- created before the command is spawned; the shell is moved into it before the script runs (the
  runner holds it at a gate on its stdin until then), so nothing it starts is ever outside it;
- on timeout, cancel or agent stop: SIGTERM to the process group and to every member of the
  cgroup, ``kill_grace_s``, then ``cgroup.kill`` and SIGKILL to the group; removed once empty;
- when the command exits by itself, what it left running (a service it started) keeps running
  and stays in ``cmd-N``; the agent never kills it later, and removes ``cmd-N`` once it is empty
  (checked whenever a command ends, and when the agent starts);
- after an agent crash, the restarted agent kills ``cmd-N`` of every command its journal shows as
  interrupted (the directory of the previous agent is recorded in ``<state dir>/cgroup``), and
  removes the empty ones.

Everything here touches only cgroupfs and procfs (kernel memory): calls are short and
synchronous, except moving a process, which may wait for an RCU grace period and so runs in a
thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import select
import signal
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import trio

logger = logging.getLogger(__name__)

MARKER_NAME = "cgroup"  # in the state directory: the agent directories in use, one per line
_COMMAND_PREFIX = "cmd-"
_PROBE_NAME = "probe"
_SHELL = "/bin/sh"
_GONE = (errno.ENOENT, errno.ENODEV)  # the cgroup was removed (under us)


class CgroupsUnavailable(Exception):
    """Why commands cannot get cgroups of their own here (the agent uses process groups only)."""


# ------------------------------------------------------------------ finding the hierarchy


def cgroup2_mounts(mounts: str) -> list[Path]:
    """Mount points of cgroup2 file systems, from the text of ``/proc/mounts``."""
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            found.append(Path(_unescape_mount(fields[1])))
    return found


def own_cgroup(proc_cgroup: str) -> str | None:
    """The process's cgroup v2 path (``"/a/b"``), from the text of ``/proc/self/cgroup``."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].split(" ", 1)[0] or "/"
    return None


def default_parent(mounts: str, proc_cgroup: str) -> Path:
    """The agent's own cgroup directory in the v2 hierarchy."""
    candidates = cgroup2_mounts(mounts)
    if not candidates:
        raise CgroupsUnavailable("no cgroup2 file system is mounted")
    own = own_cgroup(proc_cgroup)
    if own is None:
        raise CgroupsUnavailable("this process is in no cgroup v2 hierarchy")
    # A hybrid layout mounts v2 at /sys/fs/cgroup/unified, a pure one at /sys/fs/cgroup.
    for mount in candidates:
        directory = mount / own.lstrip("/")
        if (directory / "cgroup.procs").exists():
            return directory
    raise CgroupsUnavailable(f"the agent's cgroup {own} is not under {candidates[0]}")


def agent_directory_name(host_id: str, state_dir: Path) -> str:
    """A stable, unique, file-name-safe directory name for one agent identity."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", host_id)[:100]
    return f"dispatch-agent.{safe}.{digest}"


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _is_in_cgroup2(directory: Path, mounts: str) -> bool:
    resolved = directory.resolve()
    return any(resolved == mount or mount in resolved.parents for mount in cgroup2_mounts(mounts))


# ------------------------------------------------------------------ one command's cgroup


class CommandCgroup:
    """``cmd-N``: one command's processes, wherever they moved in the process tree."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __repr__(self) -> str:
        return f"CommandCgroup({str(self.path)!r})"

    def place(self, pid: int) -> None:
        """Move ``pid`` into the cgroup (OSError when the kernel refuses)."""
        with open(self.path / "cgroup.procs", "w") as procs:
            procs.write(str(pid))

    def pids(self) -> list[int]:
        """The members now (empty when the cgroup is gone)."""
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError as exc:
            if exc.errno in _GONE:
                return []
            raise
        return [int(line) for line in text.split()]

    def populated(self) -> bool:
        """Whether any live process is in it (zombies are not)."""
        try:
            events = (self.path / "cgroup.events").read_text()
        except OSError as exc:
            if exc.errno in _GONE:
                return False
            raise
        return "populated 1" in events

    def signal(self, signum: int) -> list[int]:
        """Send ``signum`` to every member; returns the pids signalled.

        A pid read from ``cgroup.procs`` could be reused by a stranger before it is signalled, so
        each is pinned with a pidfd first and signalled only if it is still a member after that.
        """
        pinned: dict[int, int] = {}
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    pinned[pid] = os.pidfd_open(pid)
            members = set(self.pids())
            sent = []
            for pid, fd in pinned.items():
                if pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signum)
                        sent.append(pid)
            return sent
        finally:
            for fd in pinned.values():
                os.close(fd)

    def kill(self) -> None:
        """SIGKILL every member at once, racing forkers included (``cgroup.kill``)."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except OSError as exc:
            if exc.errno not in _GONE:
                raise

    def remove(self) -> bool:
        """Remove the cgroup if it holds no live process; True when it is gone."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False
            raise
        return True


# ------------------------------------------------------------------ one agent's cgroups


class AgentCgroups:
    """The agent's directory of command cgroups (and those a previous agent left, for recovery).

    Not thread-safe; used from the agent's trio thread (``place`` excepted).
    """

    def __init__(self, directory: Path, *, previous: Iterable[Path] = ()) -> None:
        self.directory = directory
        self._previous = [p for p in previous if p != directory]
        self._active: set[Path] = set()  # cgroups of commands not over yet: never swept

    def __repr__(self) -> str:
        return f"AgentCgroups({str(self.directory)!r})"

    def create(self, command_host_id: int) -> CommandCgroup:
        """A new, empty cgroup for a command about to start (OSError when it cannot be made)."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.directory)
        cgroup = CommandCgroup(self.directory / f"{_COMMAND_PREFIX}{command_host_id}")
        try:
            os.mkdir(cgroup.path)
        except FileExistsError:
            # Left by an earlier run of the same id (a reset daemon database): its processes
            # are not this command's, so it gets a fresh name.
            for attempt in range(1, 1000):
                cgroup = CommandCgroup(cgroup.path.with_name(f"{cgroup.path.name}.{attempt}"))
                with contextlib.suppress(FileExistsError):
                    os.mkdir(cgroup.path)
                    break
        self._active.add(cgroup.path)
        return cgroup

    def release(self, cgroup: CommandCgroup) -> None:
        """Its command is over: it may go once empty (now, or at a later ``sweep``)."""
        self._active.discard(cgroup.path)
        self.sweep()

    async def place(self, cgroup: CommandCgroup, pid: int) -> None:
        await trio.to_thread.run_sync(cgroup.place, pid)

    def find(self, command_host_id: int) -> CommandCgroup | None:
        """The cgroup of a command a previous agent ran, if it still exists: the newest one of
        that id (``create`` gives a repeated id the next free suffix)."""
        found: list[tuple[int, Path]] = []
        for directory in (*self._previous, self.directory):
            for path in _command_dirs(directory):
                number, _, suffix = path.name[len(_COMMAND_PREFIX) :].partition(".")
                if number == str(command_host_id):
                    found.append((int(suffix) if suffix.isdigit() else 0, path))
        return CommandCgroup(max(found)[1]) if found else None

    def sweep(self) -> list[CommandCgroup]:
        """Remove every empty command cgroup of a command that is over, then the agent's
        directories if empty; returns the command cgroups still holding processes."""
        busy = []
        for directory in (self.directory, *self._previous):
            for path in _command_dirs(directory):
                if path in self._active:
                    continue
                cgroup = CommandCgroup(path)
                try:
                    removed = cgroup.remove()
                except OSError as exc:
                    logger.warning("cannot remove cgroup %s: %s", path, exc)
                    removed = False
                if not removed:
                    busy.append(cgroup)
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # fails while it has children
        self._previous = [p for p in self._previous if p.exists()]
        return busy

    def recorded_directories(self) -> list[Path]:
        return [self.directory, *self._previous]


def _command_dirs(directory: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        if entry.name.startswith(_COMMAND_PREFIX) and entry.is_dir(follow_symlinks=False):
            yield Path(entry.path)


# ------------------------------------------------------------------ set-up


@dataclass(frozen=True)
class CgroupSetup:
    """What ``open_cgroups`` decided for one agent identity.

    ``cgroups``: where new commands get their cgroups (None: process groups only).
    ``recovery``: where the command cgroups of a previous agent may be (None: nowhere).
    ``mechanism``: a line for the log, saying which mechanism is in use and why.
    """

    cgroups: AgentCgroups | None
    recovery: AgentCgroups | None
    mechanism: str


_probed: dict[Path, str | None] = {}  # parent directory -> why it does not work (None: it does)


def open_cgroups(*, enabled: bool, root: Path | None, host_id: str, state_dir: Path) -> CgroupSetup:
    """Decide, once per agent identity at start-up, how its commands will be killed.

    Blocking (it may start a probe process): call it from a thread. ``state_dir`` must exist.
    With ``enabled`` false nothing in any cgroup hierarchy is touched, not even for recovery.
    """
    if not enabled:
        return CgroupSetup(None, None, "process groups only (--no-cgroups)")
    marker = state_dir / MARKER_NAME
    previous = _read_marker(marker)
    try:
        mounts = Path("/proc/mounts").read_text()
        if root is None:
            parent = default_parent(mounts, Path("/proc/self/cgroup").read_text())
        else:
            parent = root
            if not _is_in_cgroup2(parent, mounts):
                raise CgroupsUnavailable(f"--cgroup-root {parent} is not in a cgroup2 file system")
            os.makedirs(parent, exist_ok=True)
        reason = _probed.get(parent, "")
        if reason == "":
            reason = _probed[parent] = _probe(parent)
        if reason is not None:
            raise CgroupsUnavailable(reason)
    except (CgroupsUnavailable, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        # What a previous run recorded is still recovered, as far as the hierarchy lets us.
        recovery = AgentCgroups(previous[0], previous=previous[1:]) if previous else None
        return CgroupSetup(None, recovery, f"process groups only (no usable cgroup v2: {why})")
    cgroups = AgentCgroups(parent / agent_directory_name(host_id, state_dir), previous=previous)
    _write_marker(marker, cgroups.recorded_directories())
    return CgroupSetup(
        cgroups,
        cgroups,
        f"process groups and a cgroup per command under {cgroups.directory} (cgroup.kill)",
    )


def _probe(parent: Path) -> str | None:
    """Make a cgroup, move a process into it, ``cgroup.kill`` it, remove it: None when all of
    that works, else why not."""
    probe = CommandCgroup(parent / f"dispatch-agent.{_PROBE_NAME}.{os.getpid()}")
    try:
        os.mkdir(probe.path)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create a cgroup in {parent}: {exc.strerror or exc}"
    process = None
    try:
        if not (probe.path / "cgroup.kill").exists():
            return "cgroup.kill is missing (Linux >= 5.14 needed)"
        process = subprocess.Popen([_SHELL, "-c", "read -r _"], stdin=subprocess.PIPE)
        try:
            probe.place(process.pid)
        except OSError as exc:
            return f"cannot move a process into {probe.path}: {exc.strerror or exc}"
        probe.kill()
        # Not Popen.wait(timeout): it sleeps with clock_nanosleep, which some LD_PRELOAD clock
        # shims (libfaketime) break; a pidfd and select() only need the kernel.
        pidfd = os.pidfd_open(process.pid)
        try:
            if not select.select([pidfd], [], [], 5.0)[0]:
                return "cgroup.kill did not kill the probe process"
        finally:
            os.close(pidfd)
        returncode = process.wait()
        if returncode != -signal.SIGKILL:
            return f"cgroup.kill did not kill the probe process (it ended with {returncode})"
        return None
    except OSError as exc:
        return f"probing {parent} failed: {exc.strerror or exc}"
    finally:
        if process is not None:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdin is not None:
                process.stdin.close()
        with contextlib.suppress(OSError):
            probe.remove()


def _read_marker(marker: Path) -> list[Path]:
    try:
        text = marker.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return []
    return [Path(line) for line in text.splitlines() if line.startswith("/")]


def _write_marker(marker: Path, directories: list[Path]) -> None:
    temporary = marker.with_name(marker.name + ".tmp")
    temporary.write_text("".join(f"{d}\n" for d in directories))
    os.replace(temporary, marker)
