"""Executing Runs: at most once each, at most ``max_parallel`` at a time, every one ending in a
journaled Finished event whatever happens (exit, timeout, cancel, agent stop, runner bug).

Also the start-up recovery of what a previous agent left running (``finish_interrupted``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from agent.cgroups import AgentCgroups
from agent.journal import Interrupted, Journal
from agent.process_group import ProcessInfo, is_still_ours, kill_process_group
from agent.runner import Runner, Stop
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

# Journaling a Finished only waits on the journal writer, which has its own close deadline.
_RECORD_FINISHED_TIMEOUT_S = 30.0

AGENT_STOPPED = "agent stopped"
CANCELLED = "cancelled by the daemon"


@dataclass(frozen=True, slots=True)
class WorkerStatistics:
    running: int
    queued: int
    max_parallel: int
    accepting: bool


class _Report:
    """The ``RunReport`` the worker gives a runner: it journals what the runner tells."""

    def __init__(self, journal: Journal, command_host_id: int) -> None:
        self._journal = journal
        self._command_host_id = command_host_id
        self.pid: int | None = None

    async def started(self, pid: int, process: ProcessInfo | None) -> None:
        await self._journal.record_started(self._command_host_id, pid, process)
        self.pid = pid
        logger.info("command_host %d: started, pid %d", self._command_host_id, pid)

    async def output(self, stream: pb.OutputStream, offset: int, data: bytes) -> None:
        await self._journal.record_output(self._command_host_id, stream, offset, data)


class Worker:
    """Runs what ``submit`` accepts, in the nursery of ``serve``."""

    def __init__(self, journal: Journal, runner: Runner, *, max_parallel: int) -> None:
        self._journal = journal
        self._runner = runner
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._active: dict[int, Stop] = {}
        self._accepting = True
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def submit(self, run: pb.Run) -> bool:
        """Start ``run`` unless it was ever accepted before; returns whether it was accepted."""
        command_host_id = run.command_host_id
        if not self._accepting or self._nursery is None:
            logger.info("command_host %d: not accepted, the agent is stopping", command_host_id)
            return False
        if command_host_id in self._active or self._journal.is_remembered(command_host_id):
            logger.info(
                "command_host %d: ignoring a repeated Run (it was accepted before; its events are "
                "journaled and replayed)",
                command_host_id,
            )
            return False
        stop = Stop()
        self._active[command_host_id] = stop
        self._idle = trio.Event()
        self._nursery.start_soon(self._execute, run, stop, name=f"command_host {command_host_id}")
        return True

    def cancel(self, command_host_id: int) -> None:
        stop = self._active.get(command_host_id)
        if stop is None:
            logger.info("command_host %d: Cancel ignored, it is not running", command_host_id)
            return
        logger.info("command_host %d: cancelling", command_host_id)
        stop.request(pb.Outcome.CANCELLED, CANCELLED)

    def active_ids(self) -> list[int]:
        return list(self._active)

    async def stop_all(self) -> None:
        """Take no more Runs, kill what runs, and return once every Finished is journaled."""
        self._accepting = False
        for stop in self._active.values():
            stop.request(pb.Outcome.AGENT_RESTART, AGENT_STOPPED)
        await self._idle.wait()

    def statistics(self) -> WorkerStatistics:
        running = self._limiter.borrowed_tokens
        return WorkerStatistics(
            running=running,
            queued=len(self._active) - running,
            max_parallel=int(self._limiter.total_tokens),
            accepting=self._accepting,
        )

    async def _execute(self, run: pb.Run, stop: Stop) -> None:
        command_host_id = run.command_host_id
        report = _Report(self._journal, command_host_id)
        finished: pb.Finished | None = None
        acquired = False
        try:
            with stop.cancels():
                # claim() registers the id before its first checkpoint: from then on the journal
                # knows it and must get a Finished, even if this wait is cancelled.
                await self._journal.claim(command_host_id)
                await self._limiter.acquire_on_behalf_of(command_host_id)
                acquired = True
            if not acquired or stop.requested:
                finished = pb.Finished(
                    outcome=stop.outcome, error=f"{stop.reason} before it started"
                )
                return
            finished = await self._runner(run, report, stop)
        except trio.Cancelled:
            # The agent is going down around us: still record how this command ended.
            how = "its process group was killed" if report.pid else "before it started"
            finished = pb.Finished(
                outcome=pb.Outcome.AGENT_RESTART, error=f"{AGENT_STOPPED}; {how}"
            )
            raise
        except Exception as exc:
            logger.exception("command_host %d: the runner failed", command_host_id)
            finished = pb.Finished(error=f"agent error while running the command: {exc!r}")
        finally:
            if acquired:
                self._limiter.release_on_behalf_of(command_host_id)
            with trio.move_on_after(_RECORD_FINISHED_TIMEOUT_S, shield=True):
                if finished is not None:
                    await self._record_finished(command_host_id, finished)
            del self._active[command_host_id]
            if not self._active:
                self._idle.set()

    async def _record_finished(self, command_host_id: int, finished: pb.Finished) -> None:
        try:
            await self._journal.record_finished(command_host_id, finished)
        except (trio.ClosedResourceError, KeyError, ValueError) as exc:
            logger.error(
                "command_host %d: could not journal its Finished event: %s", command_host_id, exc
            )
            return
        logger.info(
            "command_host %d: finished, %s%s%s",
            command_host_id,
            pb.Outcome(finished.outcome).name.lower(),
            f", exit code {finished.exit_code}" if finished.has_exit_code else "",
            f" ({finished.error})" if finished.error else "",
        )


async def finish_interrupted(
    journal: Journal, *, kill_grace_s: float, cgroups: AgentCgroups | None = None
) -> None:
    """Close what a previous agent left running: kill its group (and its cgroup, when
    ``cgroups`` has one for it), journal AGENT_RESTART; then remove the empty command cgroups.

    The Finished events are replayed to the daemon like any others. The cgroups of commands
    that ended normally are not killed: what they left running is theirs to keep.
    """
    interrupted = journal.interrupted()
    if interrupted:
        async with trio.open_nursery() as nursery:
            for command in interrupted:
                nursery.start_soon(_finish_one, journal, command, kill_grace_s, cgroups)
    if cgroups is not None:
        busy = cgroups.sweep()
        if busy:
            logger.info(
                "%d cgroups of commands that ended still hold processes those commands left "
                "running; they are left alone: %s",
                len(busy),
                ", ".join(str(cgroup.path) for cgroup in busy),
            )


async def _finish_one(
    journal: Journal, command: Interrupted, kill_grace_s: float, cgroups: AgentCgroups | None
) -> None:
    chid = command.command_host_id
    cgroup = cgroups.find(chid) if cgroups is not None else None
    ours = command.process is not None and is_still_ours(command.process)
    left = cgroup is not None and cgroup.populated()
    if ours or left:
        pgid = command.process.pgid if ours and command.process is not None else None
        logger.warning(
            "command_host %d: killing %s left by the previous agent",
            chid,
            " and ".join(
                ([f"process group {pgid}"] if pgid else [])
                + ([f"cgroup {cgroup.path}"] if left and cgroup is not None else [])
            ),
        )
        report = await kill_process_group(
            pgid, grace_s=kill_grace_s, cgroup=cgroup if left else None
        )
        how = report.describe(kill_grace_s)
    else:
        how = "its process group was already gone"
    if cgroup is not None:
        try:
            cgroup.remove()
        except OSError as exc:
            logger.warning("command_host %d: cannot remove %s: %s", chid, cgroup.path, exc)
    if not command.started:
        error = "agent restarted before the command's start was recorded; it may not have run"
        if ours or left:
            error += f" ({how})"
    else:
        error = f"agent restarted while the command ran; {how}"
    finished = pb.Finished(
        outcome=pb.Outcome.AGENT_RESTART,
        error=error,
        stdout_bytes=command.stdout_bytes,
        stderr_bytes=command.stderr_bytes,
    )
    await journal.record_finished(chid, finished)
    logger.info("command_host %d: recorded as interrupted by an agent restart", chid)
