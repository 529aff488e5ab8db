"""``agent/grpc_bridge.py`` against a real grpclib server on 127.0.0.1 (inside trio-asyncio).

The server (``agent_testing.serving``) hands each Connect stream to the test as a server-side
``StreamLink``, so the test plays the daemon with the same vocabulary as the agent. Every test
takes the ``aio_loop`` fixture as an argument: pytest-trio hands a fixture's context (where
trio-asyncio keeps its loop) only to tests that request it by name.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Callable

import pytest
import trio

from agent.config import AgentConfig
from agent.connection import open_agent
from agent.grpc_bridge import open_stream
from common.grpc_bridge import aio
from proto.dispatch import v1 as pb
from tests.agent.agent_testing import serving, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connects_and_exchanges_messages(aio_loop: object) -> None:
    with trio.fail_after(10):
        async with serving() as server:
            async with open_stream(server.address, "s3cret", max_message_bytes=1 << 20) as link:
                accepted = await server.accepted.receive()
                await link.send(pb.AgentMessage(sent_monotonic_ns=1, hello=pb.Hello(host_id="h")))
                hello = await accepted.link.receive()
                await accepted.link.send(
                    pb.ServerMessage(welcome=pb.Welcome(host_id="h", heartbeat_interval_ms=7))
                )
                welcome = await link.receive()
                # The daemon ending its handler ends the stream cleanly.
                accepted.done.set()
                with pytest.raises(trio.EndOfChannel):
                    await link.receive()
    assert accepted.metadata["authorization"] == "Bearer s3cret"
    assert hello == pb.AgentMessage(sent_monotonic_ns=1, hello=pb.Hello(host_id="h"))
    assert welcome == pb.ServerMessage(welcome=pb.Welcome(host_id="h", heartbeat_interval_ms=7))


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_server_going_away_is_a_broken_resource(aio_loop: object, how: str) -> None:
    with trio.fail_after(10):
        async with serving() as server:
            async with open_stream(server.address, None, max_message_bytes=1 << 20) as link:
                accepted = await server.accepted.receive()
                assert "authorization" not in accepted.metadata
                # The daemon's process dies (FIN) or its host vanishes (RST).
                await aio(_call)(getattr(accepted.transport, how))
                with pytest.raises(trio.BrokenResourceError):
                    await link.receive()
                with pytest.raises(trio.BrokenResourceError):
                    await link.send(pb.AgentMessage(heartbeat=pb.Heartbeat()))
            accepted.done.set()


async def _call(fn: Callable[[], None]) -> None:
    fn()


async def test_connection_refused_is_a_broken_resource(aio_loop: object) -> None:
    address = f"127.0.0.1:{free_port()}"
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="ConnectionRefused"):
        async with open_stream(address, "t", max_message_bytes=1 << 20):
            pass


async def test_a_message_over_the_limit_breaks_the_stream(aio_loop: object) -> None:
    with trio.fail_after(10):
        async with serving() as server:
            async with open_stream(server.address, None, max_message_bytes=64 * 1024) as link:
                accepted = await server.accepted.receive()
                big = pb.RunBatch(runs=[pb.Run(command_host_id=1, script="x" * 100_000)])
                await accepted.link.send(pb.ServerMessage(runs=big))
                with pytest.raises(trio.BrokenResourceError, match="over the limit of 65536"):
                    await link.receive()
            accepted.done.set()


async def test_an_agent_runs_a_command_over_real_grpc(
    aio_loop: object, make_config: Callable[..., AgentConfig]
) -> None:
    with trio.fail_after(20):
        async with serving() as server:
            config = make_config(server=server.address, token="tok")
            async with open_agent(config, rng=random.Random(3)) as agent:
                accepted = await server.accepted.receive()
                daemon = accepted.link
                hello = (await daemon.receive()).hello
                await daemon.send(pb.ServerMessage(welcome=pb.Welcome(host_id=hello.host_id)))
                await agent.wait_connected()
                run = pb.Run(command_host_id=31, script='echo "hi $1"; exit 4', args=["there"])
                await daemon.send(pb.ServerMessage(runs=pb.RunBatch(runs=[run])))
                events: list[pb.Event] = []
                while not events or events[-1].finished is None:
                    message = await daemon.receive()
                    if message.events is not None:
                        events.extend(message.events.events)
                acks = [pb.Ack(command_host_id=31, seq=events[-1].seq)]
                await daemon.send(pb.ServerMessage(acks=pb.AckBatch(acks=acks)))
                await wait_until(lambda: agent.journal.known_ids() == [])
            accepted.done.set()
    assert accepted.metadata["authorization"] == "Bearer tok"
    assert [e.seq for e in events] == [1, 2, 3]
    assert events[0].started.pid > 1
    assert events[1].output == pb.Output(
        stream=pb.OutputStream.STDOUT, offset=0, data=b"hi there\n"
    )
    finished = events[2].finished
    assert (finished.outcome, finished.has_exit_code, finished.exit_code) == (
        pb.Outcome.EXITED,
        True,
        4,
    )
