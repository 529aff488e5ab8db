"""Third-party internals this project touches are still there, shaped as our code expects.

Each seam names the package, the private internal, and the file of ours that relies on it. Every
package listed here carries an upper bound in ``pyproject.toml`` (checked below); to raise one,
install the new version and run this file: a failure names the code to re-read against it.
The checks look at what our code actually does with each internal (call it, replace it, read
it), so a rename, a removed attribute or a changed signature fails here by name instead of
somewhere deep in an end-to-end test.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import grpclib.client
import grpclib.const
import grpclib.protocol
import grpclib.server
import grpclib.stream
import hyperframe.frame
import pytest
import quart.asgi
import quart_trio
import quart_trio.asgi
import trio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from quart.wrappers import Response

from proto.dispatch import v1 as pb

REPO = Path(__file__).resolve().parents[1]
_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Seam:
    package: str  # distribution name, as pinned in pyproject.toml
    internal: str
    relied_on_by: str  # our file, and what it does with the internal
    check: Callable[[], None]  # raises (any exception) when the internal is not as relied on


def _parameters(function: object) -> list[str]:
    return list(inspect.signature(function).parameters)  # type: ignore[arg-type]


def _calls(function: object, name: str) -> bool:
    """Whether ``function``'s own code refers to ``name`` (an attribute or a global)."""
    return name in function.__code__.co_names  # type: ignore[attr-defined]


# ---------------------------------------------------------------- grpclib, observed on a live call


@dataclass
class _GrpclibSeen:
    client_inner: object = None  # grpclib.client.Stream._stream
    server_inner: object = None  # grpclib.server.Stream._stream
    server_sockets: object = None  # grpclib.server.Server._server.sockets
    recv_sizes: list[int] = field(default_factory=list)  # what recv_message asked recv_data for
    added: list[tuple[object, ...]] = field(default_factory=list)  # buffer.add's arguments
    message_bytes: int = 0


def _instrument(inner: object, seen: _GrpclibSeen) -> None:
    """Replace ``recv_data`` and ``buffer.add`` on the instance, as the bridge's size guard does."""
    original_recv_data = inner.recv_data  # type: ignore[attr-defined]
    buffer = inner.buffer  # type: ignore[attr-defined]
    original_add = buffer.add

    async def recv_data(size: int) -> bytes:
        seen.recv_sizes.append(size)
        data: bytes = await original_recv_data(size)
        return data

    def add(*args: object) -> None:
        seen.added.append(args)
        original_add(*args)

    inner.recv_data = recv_data  # type: ignore[attr-defined]
    buffer.add = add


async def _one_grpclib_call() -> _GrpclibSeen:
    seen = _GrpclibSeen()
    message = pb.AgentMessage(sent_monotonic_ns=7, heartbeat=pb.Heartbeat())
    seen.message_bytes = len(bytes(message))
    instrumented = asyncio.Event()

    async def handle(stream: grpclib.server.Stream[pb.AgentMessage, pb.ServerMessage]) -> None:
        seen.server_inner = getattr(stream, "_stream", None)
        try:
            _instrument(seen.server_inner, seen)
        finally:
            instrumented.set()  # the client goes on either way; the checks say what was missing
        await stream.recv_message()

    class Service:
        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {
                "/dispatch.v1.AgentService/Connect": grpclib.const.Handler(
                    handle, grpclib.const.Cardinality.STREAM_STREAM,
                    pb.AgentMessage, pb.ServerMessage,
                )
            }  # fmt: skip

    # Bound here and handed over, so reaching the server does not itself depend on _server.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = grpclib.server.Server([Service()])
    await server.start(sock=listener)
    try:
        inner_server = getattr(server, "_server", None)
        seen.server_sockets = getattr(inner_server, "sockets", None)
        channel = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with channel.request(
                "/dispatch.v1.AgentService/Connect", grpclib.const.Cardinality.STREAM_STREAM,
                pb.AgentMessage, pb.ServerMessage,
            ) as stream:  # fmt: skip
                await stream.send_request()
                seen.client_inner = getattr(stream, "_stream", None)
                await instrumented.wait()
                await stream.send_message(message, end=True)
                async for _ in stream:
                    pass
        finally:
            channel.close()
    finally:
        server.close()
        await server.wait_closed()
    return seen


@functools.cache
def _grpclib_seen() -> _GrpclibSeen:
    return asyncio.run(asyncio.wait_for(_one_grpclib_call(), _TIMEOUT_S))


def _client_stream_inner() -> None:
    inner = _grpclib_seen().client_inner
    assert isinstance(inner, grpclib.protocol.Stream), f"found {inner!r}"


def _server_stream_inner() -> None:
    inner = _grpclib_seen().server_inner
    assert isinstance(inner, grpclib.protocol.Stream), f"found {inner!r}"


def _recv_data_framing() -> None:
    assert _parameters(grpclib.protocol.Stream.recv_data) == ["self", "size"]
    assert _calls(grpclib.stream.recv_message, "recv_data")
    seen = _grpclib_seen()
    # The guard takes every 5-byte read as a header and the read after it as that message's body.
    assert seen.recv_sizes[:2] == [5, seen.message_bytes], (
        f"recv_message read {seen.recv_sizes}, expected a 5-byte header then the "
        f"{seen.message_bytes}-byte body"
    )


def _buffer_add() -> None:
    assert _parameters(grpclib.protocol.Buffer.add) == ["self", "data", "ack_size"]
    added = _grpclib_seen().added
    assert added, "buffer.add (as replaced on the instance) was never called for arriving DATA"
    assert all(
        len(args) == 2 and isinstance(args[0], bytes) and isinstance(args[1], int) for args in added
    ), f"called with {added}"


def _server_sockets() -> None:
    sockets = _grpclib_seen().server_sockets
    assert sockets, f"found {sockets!r}"
    assert all(hasattr(sock, "getsockname") for sock in sockets)  # type: ignore[attr-defined]


def _protocol_stream_transport() -> None:
    transport = getattr(_grpclib_seen().server_inner, "_transport", None)
    assert isinstance(transport, asyncio.BaseTransport), f"found {transport!r}"


def _client_stream_end_done() -> None:
    assert isinstance(grpclib.client.Stream._end_done, bool)


# ---------------------------------------------------------------- quart-trio and quart


def _quart_trio_connection_class() -> None:
    # DispatchQuart swaps the class; a QuartTrio that stopped using it would bypass the fix.
    assert quart_trio.QuartTrio.asgi_http_class is quart_trio.asgi.TrioASGIHTTPConnection
    assert quart_trio.asgi.TrioASGIHTTPConnection.__bases__ == (quart.asgi.ASGIHTTPConnection,)


def _quart_trio_handle_messages() -> None:
    connection = quart_trio.asgi.TrioASGIHTTPConnection
    assert _parameters(connection.handle_messages) == ["self", "nursery", "request", "receive"]
    assert _calls(connection.__call__, "handle_messages")


def _quart_trio_handle_request() -> None:
    # The fix notices the final body part through _send_response's ``send``.
    handle_request = quart_trio.asgi.TrioASGIHTTPConnection.handle_request
    assert _parameters(handle_request) == ["self", "nursery", "request", "send"]
    assert _calls(handle_request, "_send_response")


def _quart_handle_messages() -> None:
    # Called past quart-trio's override: super(TrioASGIHTTPConnection, self).handle_messages.
    assert _parameters(quart.asgi.ASGIHTTPConnection.handle_messages) == [
        "self", "request", "receive",
    ]  # fmt: skip


def _quart_send_response() -> None:
    send_response = quart.asgi.ASGIHTTPConnection._send_response
    assert _parameters(send_response) == ["self", "send", "response"]
    events: list[dict[str, object]] = []

    async def send(event: dict[str, object]) -> None:
        events.append(event)

    async def respond() -> None:
        app = quart_trio.QuartTrio(__name__)
        connection = quart.asgi.ASGIHTTPConnection(app, {"type": "http"})  # type: ignore[typeddict-item]
        await send_response(connection, send, Response(b"body"))  # type: ignore[arg-type]

    trio.run(respond)
    finals = [e for e in events if e["type"] == "http.response.body" and not e.get("more_body")]
    assert finals == [events[-1]], f"the final body part is not the one last event: {events}"


# ---------------------------------------------------------------- hyperframe


def _hyperframe_raw_data_repr() -> None:
    assert _parameters(hyperframe.frame._raw_data_repr) == ["data"]
    saved = hyperframe.frame._raw_data_repr
    hyperframe.frame._raw_data_repr = lambda data: "<replaced>"
    try:
        text = repr(hyperframe.frame.DataFrame(1, data=b"payload"))
    finally:
        hyperframe.frame._raw_data_repr = saved
    # Looked up as a module global at repr time, or replacing it would change nothing.
    assert text.endswith("<replaced>"), f"a DataFrame's repr did not use it: {text!r}"


SEAMS = [
    Seam("grpclib", "grpclib.client.Stream._stream (the HTTP/2 stream)",
         "common/grpc_bridge.py (_install_size_guard reads through it)", _client_stream_inner),
    Seam("grpclib", "grpclib.server.Stream._stream (the HTTP/2 stream)",
         "common/grpc_bridge.py (_install_size_guard reads through it)", _server_stream_inner),
    Seam("grpclib", "grpclib.protocol.Stream.recv_data(size), 5-byte header then body",
         "common/grpc_bridge.py (_install_size_guard replaces it to check declared lengths)",
         _recv_data_framing),
    Seam("grpclib", "grpclib.protocol.Stream.buffer.add(data, ack_size)",
         "common/grpc_bridge.py (_install_size_guard replaces it to note when bytes arrive)",
         _buffer_add),
    Seam("grpclib", "grpclib.server.Server._server.sockets",
         "daemon/agents/grpc_bridge.py (serve_grpc reports the bound address); "
         "tests/agent/agent_testing.py", _server_sockets),
    Seam("grpclib", "grpclib.protocol.Stream._transport",
         "tests/agent/agent_testing.py (Accepted.transport)", _protocol_stream_transport),
    Seam("grpclib", "grpclib.client.Stream._end_done",
         "tests/hostile/raw_grpc.py (Conversation.end)", _client_stream_end_done),
    Seam("quart-trio", "QuartTrio.asgi_http_class is TrioASGIHTTPConnection(ASGIHTTPConnection)",
         "daemon/api/http_connection.py (DispatchQuart swaps in a subclass)",
         _quart_trio_connection_class),
    Seam("quart-trio", "TrioASGIHTTPConnection.handle_messages(nursery, request, receive)",
         "daemon/api/http_connection.py (_Connection overrides it)", _quart_trio_handle_messages),
    Seam("quart-trio", "TrioASGIHTTPConnection.handle_request sends through _send_response",
         "daemon/api/http_connection.py (_Connection overrides _send_response)",
         _quart_trio_handle_request),
    Seam("quart", "quart.asgi.ASGIHTTPConnection.handle_messages(request, receive)",
         "daemon/api/http_connection.py (_Connection calls it past quart-trio's override)",
         _quart_handle_messages),
    Seam("quart", "quart.asgi.ASGIHTTPConnection._send_response(send, response), final part last",
         "daemon/api/http_connection.py (_Connection wraps its send to see the final part)",
         _quart_send_response),
    Seam("hyperframe", "hyperframe.frame._raw_data_repr(data), looked up at repr time",
         "common/grpc_bridge.py (run() replaces it with _cheap_data_repr)",
         _hyperframe_raw_data_repr),
]  # fmt: skip


@pytest.mark.parametrize("seam", SEAMS, ids=lambda seam: f"{seam.package}:{seam.check.__name__}")
def test_the_internal_is_as_relied_on(seam: Seam) -> None:
    try:
        seam.check()
    except Exception as exc:  # whatever it is, it is reported with the seam's names below
        pytest.fail(
            f"{seam.package} {version(seam.package)}: {seam.internal} changed or is gone "
            f"({type(exc).__name__}: {str(exc) or 'assertion failed'}). {seam.relied_on_by} relies "
            f"on it: adapt that code to this version of {seam.package}, then move its upper "
            "bound in pyproject.toml.",
            pytrace=False,
        )


@pytest.mark.parametrize("seam", SEAMS, ids=lambda seam: f"{seam.package}:{seam.check.__name__}")
def test_the_files_named_as_relying_on_it_exist(seam: Seam) -> None:
    # Modules move (daemon/ was reshaped); a failure above must send the reader to a real file.
    paths = re.findall(r"[\w/]+\.py", seam.relied_on_by)
    assert paths, f"{seam.internal}: relied_on_by names no file"
    missing = [path for path in paths if not (REPO / path).is_file()]
    assert not missing, f"{seam.internal}: relied_on_by names files that do not exist: {missing}"


def _dependencies() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = (Requirement(line) for line in project["dependencies"])
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


@pytest.mark.parametrize("package", sorted({seam.package for seam in SEAMS}))
def test_a_package_whose_internals_are_touched_has_an_upper_bound(package: str) -> None:
    requirement = _dependencies().get(canonicalize_name(package))
    assert requirement is not None, f"{package} is not in pyproject.toml [project.dependencies]"
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in requirement.specifier), (
        f"{package} has no upper bound in pyproject.toml ({requirement}), yet its internals are "
        "touched (see SEAMS in this file)"
    )
    installed = version(package)
    assert requirement.specifier.contains(installed, prereleases=True), (
        f"{package} {installed} is installed, outside {requirement}: these checks ran against "
        "a version the pin does not allow"
    )
