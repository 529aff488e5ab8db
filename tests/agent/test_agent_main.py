"""``python -m agent`` as a real process against a real grpclib server in the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from proto.dispatch import v1 as pb
from tests.agent.agent_testing import alive, serving, wait_dead

ROOT = Path(__file__).resolve().parents[2]


async def read_all(stream: trio.abc.ReceiveStream | None) -> str:
    assert stream is not None
    chunks = []
    while chunk := await stream.receive_some():
        chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_sigterm_stops_the_running_command_and_exits_zero(
    aio_loop: object, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        async with serving() as server:
            agent = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "agent",
                    f"--server={server.address}",
                    "--plaintext",
                    "--token=tok",
                    "--host-id=e2e-1",
                    f"--state-dir={tmp_path / 'state'}",
                    "--label=role=test",
                    "--kill-grace-s=2",
                ],
                cwd=ROOT,
                stderr=subprocess.PIPE,
            )
            pids: list[int] = []
            try:
                accepted = await server.accepted.receive()
                daemon = accepted.link
                hello = (await daemon.receive()).hello
                await daemon.send(pb.ServerMessage(welcome=pb.Welcome(host_id=hello.host_id)))
                script = "echo $$; sleep 60 & echo $!; sleep 60"
                run = pb.Run(command_host_id=8, script=script)
                await daemon.send(pb.ServerMessage(runs=pb.RunBatch(runs=[run])))
                events: list[pb.Event] = []
                while len(b"".join(e.output.data for e in events if e.output).split()) < 2:
                    message = await daemon.receive()
                    events.extend(message.events.events if message.events else [])
                pids = [int(p) for p in b"".join(e.output.data for e in events[1:]).split()]

                agent.send_signal(signal.SIGTERM)
                while events[-1].finished is None:
                    message = await daemon.receive()
                    events.extend(message.events.events if message.events else [])
                acks = [pb.Ack(command_host_id=8, seq=events[-1].seq)]
                await daemon.send(pb.ServerMessage(acks=pb.AckBatch(acks=acks)))
                status = await agent.wait()
                log = await read_all(agent.stderr)
            finally:
                accepted.done.set()
                if agent.returncode is None:
                    agent.kill()
                for pid in pids:
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
    assert status == 0, log
    assert hello.host_id == "e2e-1"
    assert hello.labels == {"role": "test"}
    assert accepted.metadata["authorization"] == "Bearer tok"
    finished = events[-1].finished
    assert finished.outcome == pb.Outcome.AGENT_RESTART
    assert finished.error == "agent stopped; process group killed (SIGTERM)"
    assert await wait_dead(pids) == []
    assert "SIGTERM received" in log
