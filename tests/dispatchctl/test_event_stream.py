"""dispatchctl's event stream without a daemon: what ``Client.events`` asks for and makes of the
events httpx-sse parses (JSON objects, resumable ids, errors in words), and how ``run`` follows a
task across broken connections (resuming from the last id, waiting as ``common.retry.Backoff``
says, giving up after ``--reconnect-s``). Time is a fake clock: nothing here sleeps."""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from typing import Any, cast

import httpx
import pytest

from common.retry import Backoff
from dispatchctl.client import ApiError, Client, Event, Unreachable
from dispatchctl.config import CtlConfig
from dispatchctl.render import Printer
from dispatchctl.run import _follow, _Follower

SSE = {"content-type": "text/event-stream; charset=utf-8"}
STREAM = (
    b": keepalive\n\n"
    b'id: 7\nevent: progress\ndata: {"total": 2,\ndata:  "finished": 1}\n\n'
    b'event: error\ndata: {"error": {"code": "internal", "message": "m"}}\n\n'
    b"retry: 100\n\n"
    b"id: 9\n\n"
    b'id: not-a-number\nevent: end\ndata: {"status": "completed"}\n\n'
)


def client_answering(*responses: httpx.Response) -> tuple[Client, list[httpx.Request]]:
    """A client whose requests get ``responses`` in turn; the requests are recorded."""
    requests: list[httpx.Request] = []
    answers = iter(responses)

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return next(answers)

    return Client(CtlConfig(), "tok-0123456789abcdef", transport=httpx.MockTransport(answer)), (
        requests
    )


def events_of(client: Client, last_event_id: int = 0) -> list[Event]:
    return list(client.events("5", last_event_id=last_event_id, output=True, read_timeout_s=1.0))


def in_chunks(body: bytes, size: int) -> Iterator[bytes]:
    yield from (body[i : i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(STREAM, id="whole"),
        pytest.param(in_chunks(STREAM, 1), id="a byte at a time"),
        pytest.param(in_chunks(STREAM.replace(b"\n", b"\r\n"), 7), id="CRLF in 7-byte reads"),
    ],
)
def test_events_are_json_objects_with_the_id_to_resume_from(body: Any) -> None:
    client, requests = client_answering(httpx.Response(200, headers=SSE, content=body))
    assert events_of(client, last_event_id=41) == [
        Event("progress", 7, {"total": 2, "finished": 1}),
        # no id of its own: still the last one the stream gave, which is where to resume
        Event("error", 7, {"error": {"code": "internal", "message": "m"}}),
        # an id that is not a change number cannot be resumed from
        Event("end", None, {"status": "completed"}),
    ]
    [request] = requests
    assert request.url.path == "/api/v1/tasks/5/events"
    assert request.url.params["output"] == "true"
    assert request.headers["Last-Event-ID"] == "41"
    assert request.headers["Accept"] == "text/event-stream"
    assert request.headers["Authorization"] == "Bearer tok-0123456789abcdef"


def test_the_api_refusing_the_stream_is_an_api_error() -> None:
    refusal = {"error": {"code": "not_found", "message": "there is no task 5"}}
    client, _ = client_answering(httpx.Response(404, json=refusal))
    with pytest.raises(ApiError) as error:
        events_of(client)
    assert (error.value.status, str(error.value)) == (
        404,
        "there is no task 5 [not_found, HTTP 404]",
    )


def test_a_cut_connection_keeps_what_came_and_says_it_broke() -> None:
    def cut() -> Iterator[bytes]:
        yield b'id: 3\nevent: task\ndata: {"status": "running"}\n\n'
        yield b"id: 4\nevent: exec"
        raise httpx.ReadError("connection reset by peer")

    client, _ = client_answering(httpx.Response(200, headers=SSE, content=cut()))
    received: list[Event] = []
    with pytest.raises(Unreachable) as error:
        received.extend(client.events("5", last_event_id=0, output=False, read_timeout_s=1.0))
    assert received == [Event("task", 3, {"status": "running"})]
    assert str(error.value) == "the event stream broke: connection reset by peer"


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (
            httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html>"),
            "the event stream broke: not an event stream (",
        ),
        (
            httpx.Response(200, headers=SSE, content=b"event: progress\ndata: {oops\n\n"),
            "the event stream broke: a 'progress' event is not JSON (",
        ),
        (
            httpx.Response(200, headers=SSE, content=b"event: task\ndata: [1]\n\n"),
            "the event stream broke: a 'task' event is not a JSON object",
        ),
    ],
)
def test_what_is_not_our_event_stream_is_said_in_words(
    response: httpx.Response, message: str
) -> None:
    client, _ = client_answering(response)
    with pytest.raises(Unreachable) as error:
        events_of(client)
    assert str(error.value).startswith(message)


# ------------------------------------------------------------------ following across breaks


class Daemon:
    """The task's event stream as a daemon would serve it: for each connection in turn, the
    events it sends, then how it ends (an exception, or None when it closes the stream)."""

    def __init__(self, *connections: tuple[list[Event], Exception | None]) -> None:
        self._connections = list(connections)
        self.resumed_from: list[int] = []  # Last-Event-ID of each connection

    def events(
        self, task_id: str, *, last_event_id: int, output: bool, read_timeout_s: float
    ) -> Iterator[Event]:
        assert task_id == "5"
        if not self._connections:
            raise AssertionError("dispatchctl connected again after it should have stopped")
        self.resumed_from.append(last_event_id)
        events, ending = self._connections.pop(0)
        yield from events
        if ending is not None:
            raise ending


class Clock:
    """Fake time that moves only when dispatchctl sleeps; the sleeps are recorded."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def follow(daemon: Daemon, clock: Clock, *, seed: int, reconnect_s: float = 60.0) -> _Follower:
    task = {"id": "5", "status": "running", "commands": [{}], "progress": {"total": 1}}
    out = Printer(json_mode=False, raw=False, stdout=io.StringIO(), stderr=io.StringIO())
    follower = _Follower(out, task, follow=False, bar=False, lookup=lambda _id: {})
    _follow(
        cast(Client, daemon),
        "5",
        follower,
        output=False,
        reconnect_s=reconnect_s,
        backoff=Backoff(0.2, 5.0, rng=random.Random(seed)),
        sleep=clock.sleep,
        clock=lambda: clock.now,
    )
    return follower


def test_follow_resumes_from_the_last_id_and_waits_start_over_after_events() -> None:
    running = Event("task", 3, {"status": "running"})
    execution = Event("execution", 4, {"id": "8", "host_id": "h", "command_index": 0,
                                       "status": "running"})  # fmt: skip
    daemon = Daemon(
        ([], Unreachable("the event stream broke: connection refused")),
        ([running, execution], Unreachable("the event stream broke: connection reset")),
        ([], ApiError(503, "unavailable", "too many open event streams; try again later")),
        ([], None),  # closed by the daemon before the end: the task goes on, so reconnect
        ([Event("end", 6, {"status": "completed"})], None),
    )
    clock = Clock()
    follower = follow(daemon, clock, seed=3)
    assert follower.status == "completed"
    assert daemon.resumed_from == [0, 0, 4, 4, 4]
    expected = Backoff(0.2, 5.0, rng=random.Random(3))
    waits = [expected.next_delay()]
    expected.reset()  # events arrived on the second connection
    waits += [expected.next_delay() for _ in range(3)]
    assert clock.slept == waits


def test_follow_gives_up_after_reconnect_s_and_says_why() -> None:
    # error events are the daemon saying it cannot go on: they are no progress, so they
    # neither start the waits over nor stop the clock
    refusing = Event("error", None, {"error": {"code": "unavailable", "message": "too many"}})
    daemon = Daemon(*[([refusing], None)] * 100)
    clock = Clock()
    with pytest.raises(Unreachable) as error:
        follow(daemon, clock, seed=5, reconnect_s=3.0)
    assert str(error.value) == (
        "the event stream failed: too many; gave up after 3 s (task 5 goes on: dispatchctl task 5)"
    )
    expected = Backoff(0.2, 5.0, rng=random.Random(5))
    assert clock.slept == [expected.next_delay() for _ in clock.slept]
    assert sum(clock.slept[:-1]) <= 3.0 < sum(clock.slept)  # the last wait crossed the limit
    assert len(daemon.resumed_from) == len(clock.slept) + 1


def test_follow_stops_when_the_task_ended_even_without_its_end_event() -> None:
    daemon = Daemon(
        ([Event("task", 9, {"status": "cancelled"})], Unreachable("the event stream broke: x"))
    )
    clock = Clock()
    assert follow(daemon, clock, seed=1).status == "cancelled"
    assert (daemon.resumed_from, clock.slept) == ([0], [])


def test_follow_leaves_other_api_errors_to_the_caller() -> None:
    daemon = Daemon(([], ApiError(401, "unauthorized", "the API token is not valid")))
    clock = Clock()
    with pytest.raises(ApiError) as error:
        follow(daemon, clock, seed=1)
    assert (error.value.status, clock.slept) == (401, [])
