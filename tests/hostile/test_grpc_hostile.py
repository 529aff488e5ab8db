"""Hostile agents over real gRPC against a real ``dispatchd`` process (``tests/e2e/cluster.py``):
bytes that are not protobuf, a message over the size limit, wrong tokens, path-like and NUL host
ids, events for another host's execution, numbers beyond the database's columns. Each gets a gRPC
status (after a ``Refusal`` where the daemon refuses the stream) and a closed stream, or, for
events, a refusal in the log and no acknowledgement; the daemon keeps serving and nothing
changes in its database.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.store import models
from proto.dispatch import v1 as pb
from tests.e2e.cluster import AGENT_TOKEN, Cluster, open_cluster
from tests.hostile import raw_grpc
from tests.hostile.catalogue import case
from tests.hostile.raw_grpc import Answer, connect, hello, in_asyncio

pytestmark = [pytest.mark.hostile, pytest.mark.e2e]

MAX_MESSAGE_BYTES = 65536


class Daemon:
    """The cluster's daemon, its database file, and row counts read straight from it."""

    def __init__(self, cluster: Cluster, db_path: Path) -> None:
        self.cluster = cluster
        self.db_path = db_path

    @property
    def grpc_port(self) -> int:
        return self.cluster.grpc_port

    def counts(self) -> dict[str, int]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as db:
            return {
                model._meta.table_name: db.execute(  # type: ignore[attr-defined]
                    f'SELECT COUNT(*) FROM "{model._meta.table_name}"'  # type: ignore[attr-defined]
                ).fetchone()[0]
                for model in models.MODELS
                if model.__name__ not in ("AuditEvent", "HostConnection")
            }

    async def healthy(self) -> bool:
        assert self.cluster.daemon is not None
        if not self.cluster.daemon.running:
            return False
        return (await self.cluster.http.get("/healthz")).status_code == 200

    def log(self) -> str:
        return self.cluster.daemon.log_text() if self.cluster.daemon else ""


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    db_path = tmp_path / "dispatch.db"
    with trio.fail_after(90):
        async with open_cluster(tmp_path, f"sqlite:///{db_path}") as cluster:
            await cluster.start_daemon("--max-message-bytes", str(MAX_MESSAGE_BYTES))
            yield Daemon(cluster, db_path)


async def refused(daemon: Daemon, token: str | None, *messages: pb.AgentMessage | bytes) -> Answer:
    """Open a stream with ``token``, send ``messages``, read until the stream ends."""

    async def scenario() -> Answer:
        async with connect(daemon.grpc_port, token) as stream:
            for message in messages:
                try:
                    await stream.send(message)
                except Exception:  # the daemon may close first; its answer is what counts
                    break
            await stream.end()
            return await stream.until_end()

    return await in_asyncio(scenario)


async def unchanged(daemon: Daemon, before: dict[str, int]) -> None:
    assert await daemon.healthy(), daemon.log()[-3000:]
    assert daemon.counts() == before
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]


# ------------------------------------------------------------------ refused streams


@case(
    "grpc.wrong_token",
    given="Connect with 'Bearer wrong-token' and a good hello",
    answer="Refusal(unauthenticated), status UNAUTHENTICATED, stream closed, no host row",
)
async def test_wrong_token(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, "wrong-token-0123456789", hello("w1"))
    assert (answer.status, answer.refusals()) == ("unauthenticated", ["unauthenticated"])
    await unchanged(daemon, before)


@case(
    "grpc.host_id_traversal",
    given="a hello with host_id '../../etc/passwd'",
    answer="Refusal(invalid_argument), status INVALID_ARGUMENT, stream closed, no host row",
)
async def test_host_id_with_a_path(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, hello("../../etc/passwd"))
    assert (answer.status, answer.refusals()) == ("invalid_argument", ["invalid_argument"])
    assert "host_id must be" in (answer.detail or "")
    await unchanged(daemon, before)


@case(
    "grpc.host_id_nul",
    given="a hello with host_id 'web\\x00-1' over the wire",
    answer="Refusal(invalid_argument), status INVALID_ARGUMENT, stream closed, no host row",
)
async def test_host_id_with_nul(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, hello("web\x00-1"))
    assert (answer.status, answer.refusals()) == ("invalid_argument", ["invalid_argument"])
    await unchanged(daemon, before)


@case(
    "grpc.garbage_bytes",
    given="b'\\xff\\xff\\xff' as the first message (decodes leniently to an empty message)",
    answer="Refusal(invalid_argument) 'the first message must be a "
    "hello', status INVALID_ARGUMENT, stream closed",
)
async def test_garbage_bytes_first(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, b"\xff\xff\xff")
    assert (answer.status, answer.refusals()) == ("invalid_argument", ["invalid_argument"])
    assert answer.detail == "the first message must be a hello"
    await unchanged(daemon, before)


@case(
    "grpc.overlong_varint",
    given="b'\\xff' * 64 as the first message (a varint that never ends)",
    answer="Refusal(invalid_argument), status INVALID_ARGUMENT, stream closed",
)
async def test_an_overlong_varint(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, b"\xff" * 64)
    assert (answer.status, answer.refusals()) == ("invalid_argument", ["invalid_argument"])
    await unchanged(daemon, before)


@case(
    "grpc.truncated_protobuf",
    given="b'\\x08' as the first message (a field tag, then nothing)",
    answer="Refusal(invalid_argument), status INVALID_ARGUMENT, stream closed",
)
async def test_truncated_protobuf(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, b"\x08")
    assert (answer.status, answer.refusals()) == ("invalid_argument", ["invalid_argument"])
    await unchanged(daemon, before)


@case(
    "grpc.invalid_utf8_string",
    given="a hello whose host_id bytes are b'\\xed\\xa0\\x80' (a UTF-8-encoded surrogate)",
    answer="Refusal(invalid_argument), status INVALID_ARGUMENT, stream closed, no host row",
)
async def test_invalid_utf8_in_a_string(daemon: Daemon) -> None:
    before = daemon.counts()
    host = b"\x0a\x03\xed\xa0\x80"  # Hello.host_id
    answer = await refused(daemon, AGENT_TOKEN, b"\x12" + bytes([len(host)]) + host)
    assert (answer.status, answer.refusals()) == ("invalid_argument", ["invalid_argument"])
    await unchanged(daemon, before)


@case(
    "grpc.message_over_limit",
    given=f"a 100 KB hello (hostname) with --max-message-bytes {MAX_MESSAGE_BYTES}",
    answer="status RESOURCE_EXHAUSTED, stream closed before the body is buffered, no host row",
)
async def test_a_message_over_the_limit(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, hello("big-1", hostname="x" * 100_000))
    await unchanged(daemon, before)
    assert answer.status == "resource_exhausted", answer
    assert "over the limit of 65536" in daemon.log()


@case(
    "grpc.message_over_limit_closes",
    given="a 100 KB hello with --max-message-bytes 65536",
    answer="the stream is closed, the host is not recorded, the daemon keeps serving",
)
async def test_a_message_over_the_limit_closes_the_stream(daemon: Daemon) -> None:
    before = daemon.counts()
    answer = await refused(daemon, AGENT_TOKEN, hello("big-1", hostname="x" * 100_000))
    assert answer.status is not None and "welcome" not in answer.kinds(), answer
    await unchanged(daemon, before)


# ------------------------------------------------------------------ events on a served stream


async def execution_on(daemon: Daemon, stream: raw_grpc.Conversation, host: str) -> pb.Run:
    """Create and start a task on ``host`` (connected as ``stream``); the Run it receives."""
    await stream.until("welcome")
    http = daemon.cluster.http
    async with _http(http) as client:
        response = await client.post("/api/v1/tasks", json={
            "name": "hostile", "commands": [{"script": "true", "timeout_s": 60}],
            "targets": {"hosts": [host]}, "start": True,
        })  # fmt: skip
        assert response.status_code == 201, response.text
    runs = await stream.until("runs")
    return runs.runs[0]


def _http(cluster_http: Any) -> Any:
    """An httpx client for this asyncio loop, like the cluster's (which belongs to trio)."""
    import httpx

    return httpx.AsyncClient(base_url=str(cluster_http.base_url),
                             headers=dict(cluster_http.headers), timeout=10)  # fmt: skip


async def execution_row(daemon: Daemon, ch_id: int) -> dict[str, Any]:
    response = await daemon.cluster.http.get(f"/api/v1/executions/{ch_id}")
    assert response.status_code == 200, response.text
    return response.json()


@case(
    "grpc.forged_host_id",
    given="host b sends Started+Finished for host a's execution over gRPC",
    answer="refused and logged ('is not its own'), no ack to b, a's execution unchanged",
)
async def test_events_for_another_hosts_execution(daemon: Daemon) -> None:
    got: dict[str, Any] = {}

    async def scenario() -> None:
        async with connect(daemon.grpc_port, AGENT_TOKEN) as a:
            await a.send(hello("a"))
            run = await execution_on(daemon, a, "a")
            got["ch_id"] = run.command_host_id
            async with connect(daemon.grpc_port, AGENT_TOKEN) as b:
                await b.send(hello("b"))
                await b.until("welcome")
                got["before"] = daemon.counts()
                await b.send(pb.AgentMessage(events=pb.EventBatch(events=[
                    pb.Event(command_host_id=run.command_host_id, seq=1,
                             started=pb.Started(pid=1)),
                    pb.Event(command_host_id=run.command_host_id, seq=2, finished=pb.Finished(
                        outcome=pb.Outcome.EXITED, has_exit_code=True, exit_code=0)),
                ])))  # fmt: skip
                needle = f"host b reported execution {run.command_host_id}, which is not its own"
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                kinds: list[str] = []
                while needle not in daemon.log() and loop.time() < deadline:
                    kinds += await b.quiet_for(0.1)
                kinds += await b.quiet_for(0.5)  # an acknowledgement would follow the flush
                got["kinds_to_b"] = kinds
                got["logged"] = needle in daemon.log()

    await in_asyncio(scenario)
    assert got["logged"], daemon.log()[-3000:]
    assert "acks" not in got["kinds_to_b"], got["kinds_to_b"]
    row = await execution_row(daemon, got["ch_id"])
    assert (row["host_id"], row["status"], row["exit_code"], row["started_at"]) == (
        "a", "dispatched", None, None,
    )  # fmt: skip
    await unchanged(daemon, got["before"])


@case(
    "grpc.absurd_offset",
    given="Output at offset 2**64 - 5 for the host's own execution",
    answer="refused and logged, not acknowledged; dispatchd keeps serving",
)
async def test_an_absurd_offset_over_grpc(daemon: Daemon) -> None:
    got: dict[str, Any] = {}

    async def scenario() -> None:
        async with connect(daemon.grpc_port, AGENT_TOKEN) as a:
            await a.send(hello("a"))
            run = await execution_on(daemon, a, "a")
            got["ch_id"] = ch_id = run.command_host_id
            await a.send(pb.AgentMessage(events=pb.EventBatch(events=[
                pb.Event(command_host_id=ch_id, seq=1, started=pb.Started(pid=1)),
            ])))  # fmt: skip
            await a.until("acks")
            got["before"] = daemon.counts()
            await a.send(pb.AgentMessage(events=pb.EventBatch(events=[
                pb.Event(command_host_id=ch_id, seq=2, output=pb.Output(
                    stream=pb.OutputStream.STDOUT, offset=2**64 - 5, data=b"abc")),
            ])))  # fmt: skip
            got["kinds"] = await a.quiet_for(2.0)

    await in_asyncio(scenario)
    assert "acks" not in got["kinds"]
    await unchanged(daemon, got["before"])
    row = await execution_row(daemon, got["ch_id"])
    assert (row["status"], row["stdout_bytes"]) == ("running", 0)
