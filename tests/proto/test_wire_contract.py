"""The generated wire contract: every message survives a round trip, and the package is ours."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import betterproto2
import pytest

import proto
from proto.dispatch import v1 as pb

REPO = Path(__file__).resolve().parents[2]

SAMPLES: list[betterproto2.Message] = [
    pb.AgentMessage(sent_monotonic_ns=123, hello=pb.Hello(
        host_id="web-1", agent_version="0.1.0", labels={"role": "web", "dc": "fra1"},
        hostname="web-1.example", max_parallel=8, known_command_host_ids=[3, 2**40])),
    pb.AgentMessage(sent_monotonic_ns=1, heartbeat=pb.Heartbeat()),
    pb.AgentMessage(sent_monotonic_ns=2, events=pb.EventBatch(events=[
        pb.Event(command_host_id=7, seq=1, monotonic_ns=10, started=pb.Started(pid=4242)),
        pb.Event(command_host_id=7, seq=2, monotonic_ns=11, output=pb.Output(
            stream=pb.OutputStream.STDERR, offset=2**33, data=b"\x00\xff bytes \xe2\x82")),
        pb.Event(command_host_id=7, seq=3, monotonic_ns=12, finished=pb.Finished(
            outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=-3, signal=0,
            error="exited with 253", stdout_bytes=5, stderr_bytes=2**34, duration_ns=99)),
        pb.Event(command_host_id=8, seq=1, monotonic_ns=13, finished=pb.Finished(
            outcome=pb.Outcome.SPAWN_ERROR, error="no such directory")),
    ])),
    pb.ServerMessage(welcome=pb.Welcome(host_id="web-1", heartbeat_interval_ms=5000,
                                        heartbeat_ttl_ms=15000, daemon_version="0.1.0")),
    pb.ServerMessage(heartbeat=pb.Heartbeat()),
    pb.ServerMessage(runs=pb.RunBatch(runs=[pb.Run(
        command_host_id=9, task_id=3, script="echo \"$1\"", args=["a b", ""], env={"X": "1"},
        cwd="/tmp", timeout_ms=60_000, output_limit_bytes=1 << 20, kill_grace_ms=5000)])),
    pb.ServerMessage(cancels=pb.CancelBatch(command_host_ids=[1, 2, 3])),
    pb.ServerMessage(acks=pb.AckBatch(acks=[pb.Ack(command_host_id=7, seq=3)])),
    pb.ServerMessage(refusal=pb.Refusal(code="unauthenticated", message="bad token")),
]  # fmt: skip


def _message_classes() -> set[type]:
    return {
        cls for _, cls in inspect.getmembers(pb, inspect.isclass)
        if issubclass(cls, betterproto2.Message) and cls.__module__ == pb.__name__
    }  # fmt: skip


def _reached(message: betterproto2.Message, seen: set[type]) -> None:
    seen.add(type(message))
    for field in dataclasses.fields(message):
        value = getattr(message, field.name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, betterproto2.Message):
                _reached(item, seen)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: betterproto2.which_one_of(m, "kind")[0])
def test_every_message_round_trips(message: betterproto2.Message) -> None:
    again = type(message)().parse(bytes(message))
    assert again == message
    assert bytes(again) == bytes(message)


def test_the_samples_cover_every_message_of_the_contract() -> None:
    seen: set[type] = set()
    for message in SAMPLES:
        _reached(message, seen)
    assert _message_classes() - seen == set()


def test_proto_is_this_repositorys_package() -> None:
    # proto-plus also installs a top-level "proto"; ours must be the one imported.
    assert Path(proto.__file__).resolve().is_relative_to(REPO)


def test_the_generated_code_matches_the_contract_file() -> None:
    source = (REPO / "proto/dispatch/v1/dispatch.proto").read_text()
    for cls in _message_classes():
        assert f"message {cls.__name__} {{" in source


def test_importing_the_messages_does_not_import_grpclib() -> None:
    # Only the grpc_bridge modules talk gRPC; a generated client stub or server base would drag
    # grpclib (and asyncio's machinery) into every module that merely reads a message.
    probe = "import sys, proto.dispatch.v1; print(sorted(m for m in sys.modules if 'grpclib' in m))"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", (
        f"importing proto.dispatch.v1 imported {done.stdout.strip()}: regenerate with "
        "proto/regenerate.sh (client_generation=none,server_generation=none)"
    )
