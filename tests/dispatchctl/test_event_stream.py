"""dispatchctl's event stream without a daemon: what ``Client.events`` asks for and makes of the
events httpx-sse parses (JSON objects, resumable ids, errors in words)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from dispatchctl.client import ApiError, Client, Event, Unreachable
from dispatchctl.config import CtlConfig

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
