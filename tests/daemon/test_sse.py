"""The task event stream over a real hypercorn listener: live events, resume with Last-Event-ID,
a lagged watcher's resync, the end event, keepalives, limits and shutdown."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from daemon.api.app import serve_http, services
from daemon.api.live import LiveEvent, LiveHub
from daemon.api.schemas import HttpLimits
from daemon.api.sse import _Renderer
from daemon.store import queries, views

TOKEN_HEADERS = {"Authorization": "Bearer test-token-0123456789"}


@pytest.fixture
def limits() -> HttpLimits:
    return HttpLimits(sse_keepalive_s=0.3, sse_replay_batch=3, max_event_streams=3)


@pytest.fixture
def live() -> LiveHub:
    return LiveHub(buffer_events=8)


@pytest.fixture
async def server(nursery: trio.Nursery, app: Any) -> AsyncIterator[str]:
    stop = trio.Event()
    urls = await nursery.start(
        functools.partial(serve_http, app, listen="127.0.0.1:0", shutdown_trigger=stop.wait)
    )
    assert urls[0].startswith("http://127.0.0.1:") and not urls[0].endswith(":0")
    yield urls[0]
    stop.set()


@pytest.fixture
async def http(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=None, headers=TOKEN_HEADERS) as client:
        yield client


class Events:
    """Reads server-sent events from a streaming httpx response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()

    async def next(self) -> dict[str, Any] | None:
        """The next event or comment; None when the server closed the stream."""
        fields: dict[str, Any] = {}
        async for line in self.lines:
            if line == "":
                if fields:
                    return fields
                continue
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value
        return fields or None

    async def event(self) -> dict[str, Any]:
        """The next event, skipping keepalives."""
        while True:
            item = await self.next()
            assert item is not None, "the stream closed"
            if "comment" not in item:
                return item

    async def quiet(self) -> None:
        """Nothing but a keepalive comes next."""
        assert await self.next() == {"comment": "keepalive"}


def kinds(items: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(item["event"], int(item["id"])) for item in items]


def execution_event(rows: Any, execution_id: int, seq: int) -> LiveEvent:
    with rows.db.connection_context():
        row = queries._execution_row(execution_id)
    return LiveEvent(seq, int(row["task_id"]), "execution", views.execution_view(row))


def output_event(task_id: int, execution_id: int, host: str, offset: int, data: bytes,
                 seq: int) -> LiveEvent:  # fmt: skip
    return LiveEvent(seq, task_id, "output", {
        "execution_id": str(execution_id), "host_id": host, "stream": "stdout",
        "offset": offset, "data": data,
    })  # fmt: skip


def progress_event(rows: Any, task_id: int, seq: int) -> LiveEvent:
    with rows.db.connection_context():
        progress = views.progress_view(queries.progress_counts(task_id))
    return LiveEvent(seq, task_id, "progress", progress)


async def eventually(predicate: Any) -> None:
    while True:
        if predicate():
            return
        await trio.sleep(0.01)


async def wait_released(app: Any, live: LiveHub) -> None:
    """The stream let go of its subscription and its slot."""
    await eventually(
        lambda: (
            not live.statistics().subscriptions
            and not services(app).event_streams.statistics().open
        )
    )


async def test_live_then_resume_then_end(app, http, rows, live):
    task_id = rows.task("t", status="running")
    h1 = rows.execution(task_id, "h1")
    h2 = rows.execution(task_id, "h2")
    snapshot_seq = rows.seq
    path = f"/api/v1/tasks/{task_id}/events"
    with trio.fail_after(10):
        async with http.stream("GET", path) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = Events(response)
            task, progress = await events.event(), await events.event()
            assert (task["event"], int(task["id"])) == ("task", snapshot_seq)
            assert task["data"] == {"id": str(task_id), "status": "running", "started_at": None,
                                    "finished_at": None, "error": None}  # fmt: skip
            assert progress["event"] == "progress"
            assert progress["data"]["by_status"] == {"pending": 2}
            await eventually(lambda: live.watched(task_id))

            # one writer batch, published out of seq order as the writer does
            s1 = rows.update_execution(h1, status="running", started_at=1_700_000_001.0)
            s2 = rows.chunk(h1, 0, b"h\xc3")  # 'é' split between two chunks
            s3 = rows.chunk(h1, 2, b"\xa9llo\n")
            for event in (
                execution_event(rows, h1, s1),
                output_event(task_id, h1, "h1", 2, b"\xa9llo\n", s3),
                output_event(task_id, h1, "h1", 0, b"h\xc3", s2),
                progress_event(rows, task_id, s3),
            ):
                live.publish(event)
            got = [await events.event() for _ in range(4)]
            assert kinds(got) == [
                ("execution", s1), ("output", s2), ("output", s3), ("progress", s3),
            ]  # fmt: skip
            assert got[0]["data"]["status"] == "running"
            assert [g["data"]["text"] for g in got[1:3]] == ["h", "éllo\n"]
            assert got[1]["data"] == {
                "execution_id": str(h1), "host_id": "h1", "stream": "stdout", "offset": 0,
                "bytes": 2, "omitted_bytes": 0, "text": "h",
            }  # fmt: skip
            assert got[3]["data"]["by_status"] == {"pending": 1, "running": 1}
            await events.quiet()
        await wait_released(app, live)

        # missed while away: the writer publishes nothing to nobody
        s4 = rows.update_execution(h2, status="succeeded", exit_code=0)
        s5 = rows.chunk(h2, 0, b"done\n")
        async with http.stream("GET", path, headers={"Last-Event-ID": str(s3)}) as response:
            events = Events(response)
            got = [await events.event() for _ in range(3)]
            assert kinds(got) == [("execution", s4), ("output", s5), ("progress", s5)]
            assert got[0]["data"]["host_id"] == "h2" and got[0]["data"]["exit_code"] == 0
            assert got[1]["data"]["text"] == "done\n"
            await events.quiet()

            s6 = rows.update_task(task_id, status="completed", finished_at=1_700_000_009.0)
            with rows.db.connection_context():
                task_row = queries.Task.select().where(queries.Task.id == task_id).dicts().get()
            live.publish(LiveEvent(s6, task_id, "task", views.task_event_view(task_row)))
            got = [await events.event() for _ in range(2)]
            assert kinds(got) == [("task", s6), ("end", s6)]
            assert got[1]["data"] == {"status": "completed"}
            assert await events.next() is None  # the server closed the stream
        await wait_released(app, live)


async def test_resume_from_zero_replays_everything_in_order(http, rows):
    task_id = rows.task("t", status="running")  # seq 1
    a = rows.execution(task_id, "a")  # 2
    b = rows.execution(task_id, "b")  # 3
    rows.chunk(a, 0, b"one")  # 4
    rows.update_execution(a, status="running")  # 5 (a's current row)
    rows.chunk(b, 0, b"xy")  # 6
    rows.chunk(b, 1, b"yz")  # 7: overlaps 6 by one byte
    rows.chunk(b, 10, b"tail")  # 8: 7 bytes never stored
    rows.update_task(task_id, status="running", started_at=1.0)  # 9
    with trio.fail_after(10):
        async with http.stream(
            "GET", f"/api/v1/tasks/{task_id}/events?last_event_id=0"
        ) as response:
            events = Events(response)
            got = [await events.event() for _ in range(8)]
            assert kinds(got) == [
                ("execution", 3), ("output", 4), ("execution", 5), ("output", 6), ("output", 7),
                ("output", 8), ("task", 9), ("progress", 9),
            ]  # fmt: skip
            texts = [g["data"]["text"] for g in got if g["event"] == "output"]
            assert texts == ["one", "xy", "z", "\n[... 7 bytes omitted ...]\ntail"]
            assert got[5]["data"]["omitted_bytes"] == 7
            await events.quiet()


async def test_a_lagged_watcher_resyncs_from_the_database(http, rows, live):
    task_id = rows.task("t", status="running")
    executions = [rows.execution(task_id, f"h{i:02}") for i in range(12)]
    with trio.fail_after(10):
        async with http.stream("GET", f"/api/v1/tasks/{task_id}/events") as response:
            events = Events(response)
            await events.event(), await events.event()
            await eventually(lambda: live.watched(task_id))
            seqs = [rows.update_execution(e, status="running") for e in executions]
            for execution, seq in zip(executions, seqs, strict=True):  # 12 > the buffer of 8
                live.publish(execution_event(rows, execution, seq))
            assert live.statistics().lagged == 1
            got = [await events.event() for _ in range(13)]
            assert kinds(got) == [("execution", s) for s in seqs] + [("progress", seqs[-1])]
            assert got[-1]["data"]["by_status"] == {"running": 12}
            await events.quiet()
            assert live.statistics().subscriptions == 1  # subscribed again


async def test_finished_task_ends_at_once(http, rows):
    task_id = rows.task("t", status="failed", finished_at=2.0)
    with trio.fail_after(10):
        async with http.stream("GET", f"/api/v1/tasks/{task_id}/events") as response:
            events = Events(response)
            got = [await events.event() for _ in range(3)]
            assert [g["event"] for g in got] == ["task", "progress", "end"]
            assert got[2]["data"] == {"status": "failed"}
            assert await events.next() is None
        headers = {"Last-Event-ID": str(rows.seq)}
        async with http.stream(
            "GET", f"/api/v1/tasks/{task_id}/events", headers=headers
        ) as response:
            events = Events(response)
            got = [await events.event() for _ in range(2)]
            assert [g["event"] for g in got] == ["progress", "end"]
            assert await events.next() is None


async def test_errors_over_the_socket_are_json(app, http, server, rows, live):
    task_id = rows.task("t")
    with trio.fail_after(10):
        response = await http.head(f"/api/v1/tasks/{task_id}/events")  # no stream held open
        assert response.status_code == 200 and response.headers["content-length"] == "0"
        await wait_released(app, live)
        response = await http.get("/api/v1/tasks/424242/events")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        async with httpx.AsyncClient(base_url=server) as anonymous:
            response = await anonymous.get("/api/v1/tasks/1/events")
            assert response.status_code == 401
            assert response.headers["content-type"] == "application/json"
            assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
        response = await http.post("/api/v1/tasks", content=b"{", headers={
            "Content-Type": "application/json"})  # fmt: skip
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
        # refused before the body was read: the answer arrives while the client still sends
        big = {"name": "x", "commands": [{"script": "x" * 8_000_000}], "targets": {"hosts": ["a"]}}
        response = await http.post("/api/v1/tasks", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        async with httpx.AsyncClient(base_url=server) as anonymous:
            response = await anonymous.post("/api/v1/tasks", json=big)
            assert response.status_code == 401
        assert (await http.get("/healthz")).status_code == 200


async def test_too_many_streams_is_503(app, http, rows, live):
    task_id = rows.task("t")
    path = f"/api/v1/tasks/{task_id}/events"
    with trio.fail_after(10):
        async with (
            http.stream("GET", path) as one,
            http.stream("GET", path) as two,
            http.stream("GET", path) as three,
        ):
            readers = [Events(response) for response in (one, two, three)]  # keep them open
            for reader in readers:
                assert (await reader.event())["event"] == "task"
            response = await http.get(path)
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "unavailable"
        await wait_released(app, live)
        async with http.stream("GET", path) as response:
            assert response.status_code == 200


async def test_shutdown_ends_open_streams(nursery, app, rows):
    task_id = rows.task("t")
    stop = trio.Event()
    done = trio.Event()

    async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        await serve_http(app, listen="127.0.0.1:0", shutdown_trigger=stop.wait,
                         graceful_timeout_s=30, task_status=task_status)  # fmt: skip
        done.set()

    with trio.fail_after(10):
        (url,) = await nursery.start(run)
        async with (
            httpx.AsyncClient(base_url=url, timeout=None, headers=TOKEN_HEADERS) as http,
            http.stream("GET", f"/api/v1/tasks/{task_id}/events") as response,
        ):
            events = Events(response)
            assert (await events.event())["event"] == "task"
            await events.event()
            stop.set()
            while (item := await events.next()) is not None:
                assert item == {"comment": "keepalive"}
        with trio.fail_after(3):  # long before the 30 s grace
            await done.wait()


def test_renderer_decodes_each_stream_incrementally():
    renderer = _Renderer(include_output=True)

    def out(seq: int, offset: int, data: bytes, stream: str = "stdout") -> dict[str, Any]:
        (frame,) = renderer.render(LiveEvent(seq, 1, "output", {
            "execution_id": 7, "host_id": "h", "stream": stream, "offset": offset, "data": data,
        }))  # fmt: skip
        lines = frame.decode().splitlines()
        assert lines[0] == f"id: {seq}"
        return json.loads(lines[2].removeprefix("data: "))

    euro = "€".encode()
    assert out(1, 0, euro[:1])["text"] == ""
    assert out(2, 0, euro[:2], "stderr")["text"] == ""  # each stream has its own decoder
    assert out(3, 1, euro[1:2])["text"] == ""
    assert out(4, 2, euro[2:] + b"!")["text"] == "€!"
    assert out(5, 2, euro[2:] + b"!?")["text"] == "?"  # an overlap sends only what is new
    assert out(6, 9, b"\xff")["text"] == "\n[... 4 bytes omitted ...]\n\ufffd"
    assert out(7, 10, b"\xe2")["text"] == ""
    assert renderer.render(LiveEvent(7, 1, "output", {})) == []  # seen already
    frames = renderer.render(LiveEvent(8, 1, "execution", {"id": "7", "host_id": "h",
                                                           "status": "succeeded"}))  # fmt: skip
    texts = [json.loads(f.decode().splitlines()[2].removeprefix("data: ")) for f in frames]
    assert [t.get("text") for t in texts] == ["\ufffd", "\ufffd", None]  # stdout, stderr, event
    assert renderer.last_id == 8
    assert renderer.render(LiveEvent(5, 1, "progress", {"total": 1})) == []  # stale progress
    assert renderer.render(LiveEvent(8, 1, "progress", {"total": 1}))[0].startswith(b"id: 8\n")


async def test_body_timeout_applies_but_not_to_the_event_stream(nursery, database, tasks, rows):
    from daemon.api.app import create_app

    quick = HttpLimits(body_timeout_s=0.3, response_timeout_s=0.2, sse_keepalive_s=0.1)
    app = create_app(database=database, tasks=tasks, live=LiveHub(buffer_events=8),
                     api_token="test-token-0123456789", limits=quick)  # fmt: skip
    task_id = rows.task("t")
    stop = trio.Event()
    with trio.fail_after(10):
        (url,) = await nursery.start(
            functools.partial(serve_http, app, listen="127.0.0.1:0", shutdown_trigger=stop.wait)
        )
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Authorization: Bearer test-token-0123456789\r\nContent-Length: 100\r\n\r\n{"na'
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}}"):
            answer += await stream.receive_some()
        assert answer.startswith(b"HTTP/1.1 408")
        assert answer.endswith(b'"code":"request_timeout","message":"the request body did not '
                               b'arrive in time"}}')  # fmt: skip
        await stream.aclose()

        async with (
            httpx.AsyncClient(base_url=url, timeout=None, headers=TOKEN_HEADERS) as http,
            http.stream("GET", f"/api/v1/tasks/{task_id}/events") as response,
        ):
            events = Events(response)
            started = trio.current_time()
            assert [(await events.event())["event"] for _ in range(2)] == ["task", "progress"]
            while trio.current_time() - started < 1.0:  # five times the response timeout
                assert await events.next() == {"comment": "keepalive"}
        stop.set()
