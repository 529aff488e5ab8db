"""HTTP connections end when they should (daemon/api/http_connection.py), over a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator

import hypercorn.config
import hypercorn.trio
import pytest
import trio

from daemon.api.http_connection import DispatchQuart

app = DispatchQuart(__name__)
stream_ended = trio.Event()


@app.get("/x")
async def x() -> dict[str, int]:
    return {"ok": 1}


@app.get("/forever")
async def forever() -> object:
    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"tick\n"
                await trio.sleep(0.05)
        finally:
            stream_ended.set()

    return body(), 200, {"Content-Type": "text/plain"}


@pytest.fixture
async def port(nursery: trio.Nursery) -> int:
    config = hypercorn.config.Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = 1
    config.accesslog = None
    urls = await nursery.start(lambda task_status: hypercorn.trio.serve(
        app, config, shutdown_trigger=trio.sleep_forever, task_status=task_status))  # fmt: skip
    return int(urls[0].rsplit(":", 1)[1])


async def read_until_closed(sock: trio.socket.SocketType, timeout_s: float) -> tuple[bytes, bool]:
    data = b""
    with trio.move_on_after(timeout_s):
        while chunk := await sock.recv(65536):
            data += chunk
        return data, True
    return data, False


async def connect(port: int) -> trio.socket.SocketType:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    return sock


async def test_connection_close_is_honoured(port: int) -> None:
    with trio.fail_after(10):
        sock = await connect(port)
        await sock.send(b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data, closed = await read_until_closed(sock, 3)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"ok":1}\n') and closed


async def test_a_kept_alive_connection_serves_many_requests_then_idles_out(port: int) -> None:
    with trio.fail_after(20):
        sock = await connect(port)
        for _ in range(20):
            await sock.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
            response = b""
            while not response.endswith(b'{"ok":1}\n'):
                response += await sock.recv(65536)
            assert response.startswith(b"HTTP/1.1 200")
        data, closed = await read_until_closed(sock, 5)
    assert (data, closed) == (b"", True)


async def test_a_client_leaving_a_stream_ends_it(port: int) -> None:
    with trio.fail_after(10):
        sock = await connect(port)
        await sock.send(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while b"tick" not in received:
            received += await sock.recv(65536)
        sock.close()
        await stream_ended.wait()
