"""Hostile HTTP that only the wire can carry, against a real ``dispatchd`` (hypercorn in front of
the app): header bytes that are not latin-1, a chunked body over the limit, oversized headers and
request lines, NUL in a header, raw non-UTF-8 bytes in the path, a negative Content-Length.

What the app sees gets the JSON error of API.md. What is not HTTP at all is answered by hypercorn
itself before the app runs (h11 refuses it): the status is right (400, or 431 for headers over
its 16 KiB limit) and the connection is closed, but the body is empty, not the JSON error; that
is the server library's, and these tests pin it so a change shows.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from daemon.store import models
from tests.e2e.cluster import API_TOKEN, Cluster, open_cluster
from tests.hostile.catalogue import assert_json_error, register

pytestmark = [pytest.mark.hostile, pytest.mark.e2e]

AUTH = f"Authorization: Bearer {API_TOKEN}\r\n".encode()
GOOD = json.dumps(
    {"name": "n", "commands": [{"script": "true"}], "targets": {"hosts": ["web-1"]}}
).encode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the answer


async def exchange(port: int, raw: bytes, *, wait_close: bool = True) -> Reply:
    """Send ``raw`` bytes, read one answer (by Content-Length) and (``wait_close``) whether the
    server then closed the connection."""
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(raw)
            except trio.BrokenResourceError:
                pass  # the server answered and closed before taking everything
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                assert chunk, data
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)
            }
            length = int(headers.get("content-length", "0"))
            while len(body) < length:
                chunk = await stream.receive_some(65536)
                assert chunk
                body += chunk
            closed = False
            with trio.move_on_after(2 if wait_close else 0):
                try:
                    closed = await stream.receive_some(65536) == b""
                except trio.BrokenResourceError:
                    closed = True
            return Reply(int(status_line.split()[1]), headers, body, closed)


@dataclass
class Daemon:
    cluster: Cluster
    db_path: Path

    @property
    def port(self) -> int:
        return self.cluster.http_port

    def counts(self) -> dict[str, int]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as db:
            return {
                m._meta.table_name: db.execute(f'SELECT COUNT(*) FROM "{m._meta.table_name}"')  # type: ignore[attr-defined]
                .fetchone()[0]
                for m in models.MODELS
                if m.__name__ != "AuditEvent"
            }  # fmt: skip

    async def still_serving(self, before: dict[str, int]) -> None:
        assert (await self.cluster.http.get("/healthz")).status_code == 200
        assert self.counts() == before
        log = self.cluster.daemon.log_text() if self.cluster.daemon else ""
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    db_path = tmp_path / "dispatch.db"
    with trio.fail_after(90):
        async with open_cluster(tmp_path, f"sqlite:///{db_path}") as cluster:
            await cluster.start_daemon()
            yield Daemon(cluster, db_path)


def request(first_line: bytes, *headers: bytes, body: bytes = b"") -> bytes:
    return first_line + b"\r\nHost: x\r\n" + b"".join(headers) + b"\r\n" + body


@dataclass(frozen=True)
class WireCase:
    name: str
    given: str
    raw: bytes
    status: int
    code: str | None  # None: answered by hypercorn, with an empty body
    closes: bool


CHUNKS = b"".join(b"10000\r\n" + b"a" * 65536 + b"\r\n" for _ in range(32)) + b"0\r\n\r\n"
CASES = [
    WireCase("auth_utf8_token", "Authorization: Bearer 令牌 (UTF-8 bytes, not latin-1)",
             request(b"GET /api/v1/tasks HTTP/1.1",
                     "Authorization: Bearer 令牌\r\n".encode()), 401, "unauthorized", False),
    WireCase("auth_control_bytes", "Authorization: Bearer \\x01\\x7f\\xff",
             request(b"GET /api/v1/hosts HTTP/1.1", b"Authorization: Bearer \x01\x7f\xff\r\n"),
             401, "unauthorized", False),
    WireCase("chunked_over_limit", "POST /tasks, 2 MiB as chunked transfer (no Content-Length)",
             request(b"POST /api/v1/tasks HTTP/1.1", AUTH,
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n",
                     body=CHUNKS), 413, "payload_too_large", False),
    WireCase("header_oversized", "a 100 KB header value",
             request(b"GET /api/v1/tasks HTTP/1.1", AUTH, b"X-Pad: " + b"a" * 100_000 + b"\r\n"),
             431, None, True),
    WireCase("request_line_oversized", "GET /api/v1/tasks?<100 KB of query>",
             request(b"GET /api/v1/tasks?" + b"a" * 100_000 + b"=1 HTTP/1.1", AUTH),
             431, None, True),
    WireCase("nul_in_header", "Idempotency-Key: a\\x00b on POST /tasks",
             request(b"POST /api/v1/tasks HTTP/1.1", AUTH, b"Idempotency-Key: a\x00b\r\n",
                     b"Content-Type: application/json\r\n",
                     b"Content-Length: %d\r\n" % len(GOOD), body=GOOD), 400, None, True),
    WireCase("raw_ff_in_path", "GET /api/v1/tasks/\\xff (a raw byte, not percent-encoded)",
             request(b"GET /api/v1/tasks/\xff HTTP/1.1", AUTH), 400, None, True),
    WireCase("negative_content_length", "POST /tasks with Content-Length: -1",
             request(b"POST /api/v1/tasks HTTP/1.1", AUTH, b"Content-Type: application/json\r\n",
                     b"Content-Length: -1\r\n", body=b"{}"), 400, None, True),
]  # fmt: skip

for _case in CASES:
    register(f"http.wire.{_case.name}", "http", _case.given,
             f"{_case.status} " + (_case.code or "(hypercorn's answer, empty body)")
             + (", connection closed" if _case.closes else ""))  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_wire_input_is_refused_and_changes_nothing(daemon: Daemon, case: WireCase) -> None:
    before = daemon.counts()
    reply = await exchange(daemon.port, case.raw, wait_close=case.closes)
    if case.code is None:
        assert (reply.status, reply.body) == (case.status, b""), reply
    else:
        assert reply.headers["content-type"] == "application/json", reply
        assert_json_error(reply.status, json.loads(reply.body), case.status, case.code)
    if case.closes:
        assert reply.closed, reply
    await daemon.still_serving(before)


register("http.wire.connection_close", "http", "GET /api/v1/tasks with 'Connection: close'",
         "the answer, then the server closes the connection")  # fmt: skip


async def test_connection_close_is_honoured(daemon: Daemon) -> None:
    reply = await exchange(daemon.port, request(b"GET /api/v1/tasks HTTP/1.1", AUTH,
                                                b"Connection: close\r\n"))  # fmt: skip
    assert reply.status == 200
    assert reply.closed
