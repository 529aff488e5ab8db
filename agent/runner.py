"""Running one command: ``/bin/sh -c SCRIPT dispatch ARG...`` in its own session (and, where the
agent has cgroups, in its own cgroup), its output read, coalesced and capped, its whole process
group (and cgroup) killed on timeout or stop.

With a cgroup, the shell is first started as a *gate*, ``/bin/sh -c 'read -r _ || exit 125; exec
/bin/sh -c "$0" "$@" </dev/null' SCRIPT dispatch ARG...``: it waits on its stdin until the agent
has moved it into the cgroup (and journaled its pid), then becomes the command, with the same pid
and stdin from /dev/null. So nothing the script starts can be outside the cgroup, and a script
whose start was not journaled never runs (an agent dying at that moment closes the gate's pipe).

A runner is any ``Runner`` callable: the worker hands it the Run, a ``RunReport`` to tell what
happened and a ``Stop`` that asks it to end early; it returns the ``Finished`` record. The real
one is ``ProcessRunner``; a load generator can pass a fake that never forks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import trio

from agent.cgroups import AgentCgroups, CommandCgroup
from agent.output import OutputPump, RunReport
from agent.process_group import (
    KillReport,
    KillResult,
    describe_process,
    kill_process_group,
)
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

SHELL = "/bin/sh"
ARGV0 = "dispatch"  # $0 of the script; its arguments are $1...
# Run as ``sh -c GATE SCRIPT dispatch ARG...``; see the module docstring.
GATE = 'read -r _ || exit 125; exec /bin/sh -c "$0" "$@" </dev/null'


class Stop:
    """A request to end a command before it exits by itself: the outcome and why.

    The first request wins. ``cancels()`` gives a cancel scope that a request cancels, for
    whatever the caller is waiting on (a free slot, the process).
    """

    def __init__(self) -> None:
        self.outcome = pb.Outcome.UNSPECIFIED
        self.reason = ""
        self._event = trio.Event()
        self._scopes: set[trio.CancelScope] = set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, outcome: pb.Outcome, reason: str) -> None:
        if self.requested:
            return
        self.outcome = outcome
        self.reason = reason
        self._event.set()
        for scope in self._scopes:
            scope.cancel()

    async def wait(self) -> None:
        await self._event.wait()

    @contextlib.contextmanager
    def cancels(self) -> Iterator[trio.CancelScope]:
        with trio.CancelScope() as scope:
            if self.requested:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)


Runner = Callable[[pb.Run, RunReport, Stop], Awaitable[pb.Finished]]


@dataclass(frozen=True)
class RunnerSettings:
    chunk_bytes: int = 64 * 1024
    flush_s: float = 0.05
    default_output_limit_bytes: int = 1024 * 1024
    default_kill_grace_s: float = 5.0
    pipe_drain_s: float = 2.0
    # After SIGKILL, how long to wait for the kernel to let the process go (D state, NFS...).
    reap_timeout_s: float = 5.0
    # A cgroup per command (None: process groups only); see ``agent.cgroups``.
    cgroups: AgentCgroups | None = None


class ProcessRunner:
    """The real ``Runner``: a shell in a new session, per ``RunnerSettings``."""

    def __init__(self, settings: RunnerSettings) -> None:
        self._settings = settings

    async def __call__(self, run: pb.Run, report: RunReport, stop: Stop) -> pb.Finished:
        settings = self._settings
        grace_s = run.kill_grace_ms / 1000 if run.kill_grace_ms else settings.default_kill_grace_s
        limit = run.output_limit_bytes or settings.default_output_limit_bytes
        cgroup = self._new_cgroup(run.command_host_id)
        try:
            spawned_at, spawned_ns = trio.current_time(), time.monotonic_ns()
            gate = [SHELL, "-c", GATE] if cgroup is not None else [SHELL, "-c"]
            process = await trio.lowlevel.open_process(
                [*gate, run.script, ARGV0, *run.args],
                stdin=subprocess.DEVNULL if cgroup is None else subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=run.cwd or None,
                env={**os.environ, **run.env},
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            self._done_with(cgroup)
            where = f" in {run.cwd}" if run.cwd else ""
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return pb.Finished(
                outcome=pb.Outcome.SPAWN_ERROR, error=f"could not start {SHELL}{where}: {reason}"
            )
        child = _Child(process, spawned_at=spawned_at, spawned_ns=spawned_ns)
        if cgroup is not None:
            child.cgroup = await self._enter(cgroup, process.pid, run.command_host_id)
        assert process.stdout is not None and process.stderr is not None
        pumps = (
            OutputPump(
                pb.OutputStream.STDOUT,
                process.stdout,
                limit,
                report,
                chunk_bytes=settings.chunk_bytes,
                flush_s=settings.flush_s,
            ),
            OutputPump(
                pb.OutputStream.STDERR,
                process.stderr,
                limit,
                report,
                chunk_bytes=settings.chunk_bytes,
                flush_s=settings.flush_s,
            ),
        )
        try:
            await report.started(process.pid, describe_process(process.pid))
            await _open_gate(process)
            async with trio.open_nursery() as nursery:
                for pump in pumps:
                    nursery.start_soon(pump.run)
                outcome, killed = await self._supervise(child, run, stop, grace_s)
                # A background job that inherited the pipes may keep them open for ever: read
                # what is left for a bounded time only.
                with trio.move_on_after(settings.pipe_drain_s):
                    for pump in pumps:
                        await pump.wait_eof()
                for pump in pumps:
                    pump.stop_reading()
            for pump in pumps:
                await pump.finish()
        finally:
            with trio.CancelScope(shield=True):
                if process.stdin is not None:  # a gate never opened stays shut
                    await process.stdin.aclose()
                if process.returncode is None:  # cancelled from outside: still kill it all
                    await self._kill(child, grace_s, run.command_host_id)
                for pipe in (process.stdout, process.stderr):
                    await pipe.aclose()
                self._done_with(child.cgroup, run.command_host_id)
        return self._finished(child, run, outcome, killed, grace_s, stop, pumps)

    def _new_cgroup(self, command_host_id: int) -> CommandCgroup | None:
        cgroups = self._settings.cgroups
        if cgroups is None:
            return None
        try:
            return cgroups.create(command_host_id)
        except OSError as exc:
            logger.warning(
                "command_host %d: no cgroup of its own (%s); only its process group will be "
                "killed on timeout or cancel",
                command_host_id,
                exc.strerror or exc,
            )
            return None

    async def _enter(
        self, cgroup: CommandCgroup, pid: int, command_host_id: int
    ) -> CommandCgroup | None:
        assert self._settings.cgroups is not None
        try:
            await self._settings.cgroups.place(cgroup, pid)
        except OSError as exc:
            logger.warning(
                "command_host %d: could not move pid %d into %s (%s); only its process group "
                "will be killed on timeout or cancel",
                command_host_id,
                pid,
                cgroup.path,
                exc.strerror or exc,
            )
            self._done_with(cgroup)
            return None
        return cgroup

    def _done_with(self, cgroup: CommandCgroup | None, command_host_id: int = 0) -> None:
        """The command is over: remove its cgroup once empty (a killed command's is; what a
        command that exited by itself left running stays in it, and it is removed later)."""
        cgroups = self._settings.cgroups
        if cgroup is None or cgroups is None:
            return
        cgroups.release(cgroup)
        still = cgroup.pids()
        if still:
            logger.info(
                "command_host %d: %d processes it started are still running (in %s); they are "
                "left alone and the cgroup is removed once they are gone",
                command_host_id,
                len(still),
                cgroup.path,
            )

    async def _supervise(
        self, child: _Child, run: pb.Run, stop: Stop, grace_s: float
    ) -> tuple[pb.Outcome, KillReport | None]:
        timeout_s = run.timeout_ms / 1000 if run.timeout_ms else math.inf
        with trio.move_on_at(child.spawned_at + timeout_s), stop.cancels():
            await child.wait()
            return pb.Outcome.EXITED, None
        if child.exited_by_itself():  # in the same instant as the timeout or the stop
            return pb.Outcome.EXITED, None
        outcome = stop.outcome if stop.requested else pb.Outcome.TIMED_OUT
        with trio.CancelScope(shield=True):
            killed = await self._kill(child, grace_s, run.command_host_id)
        return outcome, killed

    async def _kill(self, child: _Child, grace_s: float, command_host_id: int) -> KillReport:
        result = KillReport(KillResult.ALREADY_GONE)
        reap_s = self._settings.reap_timeout_s
        with trio.move_on_after(grace_s + reap_s) as bound:
            async with trio.open_nursery() as nursery:
                # Reaping runs alongside: a zombie leader would keep the group "alive".
                nursery.start_soon(child.wait)
                result = await kill_process_group(
                    child.pgid, grace_s=grace_s, cgroup=child.cgroup, reap_timeout_s=reap_s
                )
        if bound.cancelled_caught:
            logger.error(
                "command_host %d: pid %d did not exit after SIGKILL; giving up on it",
                command_host_id,
                child.pgid,
            )
        return result

    def _finished(
        self,
        child: _Child,
        run: pb.Run,
        outcome: pb.Outcome,
        killed: KillReport | None,
        grace_s: float,
        stop: Stop,
        pumps: tuple[OutputPump, OutputPump],
    ) -> pb.Finished:
        finished = pb.Finished(
            outcome=outcome,
            stdout_bytes=pumps[0].total,
            stderr_bytes=pumps[1].total,
            duration_ns=child.duration_ns(),
        )
        returncode = child.process.returncode
        if returncode is not None and returncode >= 0:
            finished.has_exit_code = True
            finished.exit_code = returncode
        elif returncode is not None:
            finished.signal = -returncode
        if outcome == pb.Outcome.EXITED:
            finished.error = _describe_exit(returncode)
        else:
            how = killed.describe(grace_s) if killed else "process group state unknown"
            if outcome == pb.Outcome.TIMED_OUT:
                finished.error = f"timed out after {run.timeout_ms / 1000:.1f} s; {how}"
            else:
                finished.error = f"{stop.reason}; {how}"
        return finished


class _Child:
    """The spawned shell: its group id, and when it started and ended on the monotonic clock."""

    def __init__(self, process: trio.Process, *, spawned_at: float, spawned_ns: int) -> None:
        self.process = process
        self.pgid = process.pid  # start_new_session: the shell leads its own group
        self.cgroup: CommandCgroup | None = None
        # Taken just before the spawn: the child runs before open_process returns, so a later
        # stamp would report a duration shorter than the command really ran.
        self.spawned_at = spawned_at
        self._spawned_ns = spawned_ns
        self._exited_ns: int | None = None

    async def wait(self) -> None:
        await self.process.wait()
        self._note_exit()

    def exited_by_itself(self) -> bool:
        if self.process.poll() is None:
            return False
        self._note_exit()
        return True

    def _note_exit(self) -> None:
        if self._exited_ns is None:
            self._exited_ns = time.monotonic_ns()

    def duration_ns(self) -> int:
        return (self._exited_ns or time.monotonic_ns()) - self._spawned_ns


async def _open_gate(process: trio.Process) -> None:
    """Let a gated shell become the command (see the module docstring)."""
    if process.stdin is None:
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await process.stdin.send_all(b"go\n")
    await process.stdin.aclose()


def _describe_exit(returncode: int | None) -> str:
    if returncode is None or returncode == 0:
        return ""
    if returncode > 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"
