"""The agent's lifetime and its link to the daemon.

``open_agent`` nests the lifetimes so the shutdown order reads in the code: the journal outlives
the worker and the connection loop; on the way out the worker stops taking Runs and kills what
runs, the journal is flushed, the last events get a bounded chance to be acknowledged, and only
then the connection goes. ``run_agent`` is the program: that, until SIGTERM or SIGINT.

The connection loop dials, says Hello, waits for Welcome (or Refusal), then runs one
``session.Session`` until the stream ends or goes silent, and dials again after a backoff with
full jitter, so a fleet reconnecting after a daemon restart spreads out instead of stampeding.
Each attempt presents what ``agent.credential.Credentials`` says (the host's own credential, or
the enrolment token while it has none); a refusal waits the longest backoff.
"""

from __future__ import annotations

import functools
import logging
import random
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import betterproto2
import trio

from agent import __version__, grpc_bridge
from agent.cgroups import AgentCgroups, open_cgroups
from agent.config import AgentConfig
from agent.credential import CredentialFile, Credentials
from agent.journal import Journal, JournalStatistics, open_journal
from agent.runner import ProcessRunner, Runner, RunnerSettings
from agent.session import Session, agent_message
from agent.worker import Worker, WorkerStatistics, finish_interrupted
from common import tls
from common.link import AgentLink
from common.retry import Backoff
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

Connect = Callable[[], AbstractAsyncContextManager[AgentLink]]


@dataclass(frozen=True, slots=True)
class AgentStatistics:
    host_id: str
    connected: bool
    sessions: int
    worker: WorkerStatistics
    journal: JournalStatistics


@dataclass(frozen=True, slots=True)
class _Ended:
    reason: str
    welcomed: bool = False
    refused: bool = False


class _HandshakeFailed(Exception):
    def __init__(self, reason: str, *, refused: bool = False) -> None:
        super().__init__(reason)
        self.refused = refused


def runner_settings(config: AgentConfig, cgroups: AgentCgroups | None = None) -> RunnerSettings:
    return RunnerSettings(
        chunk_bytes=config.output_chunk_bytes,
        flush_s=config.output_flush_s,
        default_output_limit_bytes=config.output_limit_bytes,
        default_kill_grace_s=config.kill_grace_s,
        pipe_drain_s=config.pipe_drain_s,
        cgroups=cgroups,
    )


def tls_context(config: AgentConfig) -> ssl.SSLContext | None:
    """The TLS context the agent dials with; None with ``--plaintext``."""
    if config.plaintext:
        return None
    return tls.client_context(config.tls_ca, config.tls_cert, config.tls_key)


def stream_opener(config: AgentConfig, credential: Callable[[], str | None]) -> Connect:
    """How the agent dials the daemon: a real gRPC stream to ``config.server``, presenting what
    ``credential()`` says at each attempt."""
    context = tls_context(config)

    def connect() -> AbstractAsyncContextManager[AgentLink]:
        return grpc_bridge.open_stream(
            config.server,
            credential(),
            max_message_bytes=config.max_message_bytes,
            connect_timeout_s=config.connect_timeout_s,
            tls=context,
        )

    return connect


class Agent:
    """One agent identity; create with ``open_agent``. Many can live in one process."""

    def __init__(
        self,
        config: AgentConfig,
        journal: Journal,
        worker: Worker,
        connect: Connect | None,
        rng: random.Random,
    ) -> None:
        self.config = config
        self.journal = journal
        self.worker = worker
        self.credentials = Credentials(
            CredentialFile(config.journal_dir), config.token, config.host_id
        )
        self._connect = connect or stream_opener(config, self.credentials.to_present)
        self._backoff = Backoff(config.reconnect_min_s, config.reconnect_max_s, rng=rng)
        self._sessions = 0
        self._connected = trio.Event()
        self._session: Session | None = None

    @property
    def host_id(self) -> str:
        return self.config.host_id

    @property
    def connected(self) -> bool:
        return self._session is not None

    async def wait_connected(self) -> None:
        """Until a stream is open and welcomed."""
        await self._connected.wait()

    def statistics(self) -> AgentStatistics:
        return AgentStatistics(
            host_id=self.host_id,
            connected=self.connected,
            sessions=self._sessions,
            worker=self.worker.statistics(),
            journal=self.journal.statistics(),
        )

    def hello(self) -> pb.AgentMessage:
        known = set(self.journal.known_ids()) | set(self.worker.active_ids())
        return agent_message(
            hello=pb.Hello(
                host_id=self.host_id,
                agent_version=__version__,
                labels=dict(self.config.labels),
                hostname=socket.gethostname(),
                max_parallel=self.config.max_parallel,
                known_command_host_ids=sorted(known),
            )
        )

    async def serve_connections(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Stay connected to the daemon for ever, reconnecting after every loss."""
        task_status.started()
        while True:
            ended = await self._connect_once()
            if ended.refused:
                delay = self.config.reconnect_max_s
            else:
                if ended.welcomed:
                    self._backoff.reset()
                delay = self._backoff.next_delay()
            logger.warning("host %s: %s; trying again in %.2f s", self.host_id, ended.reason, delay)
            await trio.sleep(delay)

    async def stop(self, *, deliver: bool) -> None:
        """Stop taking Runs, kill what runs, flush, and (if ``deliver``) wait briefly for acks."""
        running = len(self.worker.active_ids())
        logger.info("host %s: stopping; %d commands to stop", self.host_id, running)
        await self.worker.stop_all()
        await self.journal.flush()
        if not deliver or self.config.shutdown_delivery_s <= 0:
            return
        with trio.move_on_after(self.config.shutdown_delivery_s) as waiting:
            await self.journal.wait_acknowledged()
        if waiting.cancelled_caught:
            logger.warning(
                "host %s: %d events not acknowledged yet; they stay journaled and are replayed "
                "after the next start",
                self.host_id,
                self.journal.statistics().unacked_events,
            )

    async def _connect_once(self) -> _Ended:
        welcomed = False
        try:
            async with self._connect() as link:
                welcome = await self._handshake(link)
                welcomed = True
                self._sessions += 1
                session = Session(self.config, self.journal, self.worker, link, welcome)
                self._session = session
                self._connected.set()
                try:
                    reason, refused = await session.run()
                finally:
                    self._session = None
                    self._connected = trio.Event()
                return _Ended(reason, welcomed=True, refused=refused)
        except _HandshakeFailed as exc:
            return _Ended(str(exc), refused=exc.refused)
        except trio.EndOfChannel:
            return _Ended("the daemon ended the stream before its Welcome")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            what = "the stream broke" if welcomed else "could not connect"
            return _Ended(f"{what}: {exc}", welcomed=welcomed)

    async def _handshake(self, link: AgentLink) -> pb.Welcome:
        await link.send(self.hello())
        timeout_s = self.config.connect_timeout_s
        with trio.move_on_after(timeout_s):
            first = await link.receive()
            kind, value = betterproto2.which_one_of(first, "kind")
            if kind == "welcome":
                assert isinstance(value, pb.Welcome)
                await self.credentials.welcomed(value)
                logger.info(
                    "host %s: connected to %s (daemon %s) as %s",
                    self.host_id,
                    self.config.server,
                    value.daemon_version or "?",
                    value.host_id or self.host_id,
                )
                return value
            if kind == "refusal":
                assert isinstance(value, pb.Refusal)
                self.credentials.refused(value)
                raise _HandshakeFailed(f"refused ({value.code})", refused=True)
            raise _HandshakeFailed(f"expected Welcome, got {kind or 'an empty message'}")
        raise _HandshakeFailed(f"no Welcome within {timeout_s:.1f} s")


@asynccontextmanager
async def open_agent(
    config: AgentConfig,
    *,
    runner: Runner | None = None,
    connect: Connect | None = None,
    rng: random.Random | None = None,
) -> AsyncIterator[Agent]:
    """An agent identity running in the caller's trio run (with an asyncio loop open when
    ``connect`` is the default gRPC one).

    ``runner`` replaces process execution (a load generator's fake); ``connect`` replaces the
    gRPC stream (tests use ``common.link.memory_link_pair``). Leaving the block normally stops
    the agent gracefully; leaving it by an exception or cancellation still kills the running
    commands and journals their Finished events, but skips the delivery wait.
    """
    async with open_journal(
        config.journal_dir,
        fsync=config.journal_fsync,
        compact_bytes=config.journal_compact_bytes,
        remembered_ids=config.remembered_ids,
    ) as journal:
        setup = await trio.to_thread.run_sync(
            functools.partial(
                open_cgroups,
                enabled=config.cgroups and runner is None,
                root=config.cgroup_root,
                host_id=config.host_id,
                state_dir=config.journal_dir,
            )
        )
        if runner is None:
            log = logger.warning if config.cgroups and setup.cgroups is None else logger.info
            log("host %s: on timeout or cancel, commands are killed by %s", config.host_id,
                setup.mechanism)  # fmt: skip
        await finish_interrupted(journal, kill_grace_s=config.kill_grace_s, cgroups=setup.recovery)
        worker = Worker(
            journal,
            runner or ProcessRunner(runner_settings(config, setup.cgroups)),
            max_parallel=config.max_parallel,
        )
        agent = Agent(config, journal, worker, connect, rng or random.Random())
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.serve)
            await nursery.start(agent.serve_connections)
            try:
                yield agent
            except BaseException:
                with trio.CancelScope(shield=True):
                    await agent.stop(deliver=False)
                raise
            else:
                await agent.stop(deliver=True)
            finally:
                nursery.cancel_scope.cancel()


async def run_agent(config: AgentConfig) -> None:
    """The dispatch-agent program: serve until SIGTERM or SIGINT, then stop gracefully."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with open_agent(config) as agent:
            logger.info(
                "host %s: dispatch-agent %s started; journal in %s",
                agent.host_id,
                __version__,
                config.journal_dir,
            )
            async for signum in signals:
                logger.info("host %s: %s received", agent.host_id, signal.Signals(signum).name)
                break
    logger.info("host %s: stopped", config.host_id)
