"""A command's output on its way out: read from a pipe, coalesced into chunks, capped.

Each stream is read by an ``OutputPump`` and reported through the ``RunReport`` the runner was
given. Below 4× the output limit every byte is forwarded live; past it only the last half of the
limit is kept (``Tail``) and sent when the process ends, so an output bomb cannot flood the
network or memory while the daemon can still store the head and the tail.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Protocol

import trio

from agent.process_group import ProcessInfo
from proto.dispatch import v1 as pb


class RunReport(Protocol):
    """Where a runner reports a command's progress (the worker journals it)."""

    async def started(self, pid: int, process: ProcessInfo | None) -> None: ...

    async def output(self, stream: pb.OutputStream, offset: int, data: bytes) -> None: ...


class OutputPump:
    """Reads one of the command's streams and reports it in chunks, within the output cap.

    Bytes below offset 4*L are forwarded live, coalesced up to ``chunk_bytes`` or ``flush_s``.
    Past that, nothing more goes out live; the last T = L - L//2 bytes are kept and sent when the
    process ends, so the daemon can store the first L//2 bytes and the last T whatever the size.
    """

    def __init__(
        self,
        stream: pb.OutputStream,
        source: trio.abc.ReceiveStream,
        limit: int,
        report: RunReport,
        *,
        chunk_bytes: int,
        flush_s: float,
    ) -> None:
        self.total = 0  # bytes read so far: the stream's size once it ended
        self._stream = stream
        self._source = source
        self._chunk_bytes = chunk_bytes
        self._flush_s = flush_s
        self._report = report
        self._live_limit = 4 * limit
        self._tail = Tail(limit - limit // 2)
        self._sent = 0  # end offset of what was reported
        self._pending = bytearray()
        self._pending_since = 0.0
        self._reading = True
        self._receive_scope: trio.CancelScope | None = None
        self._eof = trio.Event()

    async def run(self) -> None:
        try:
            while self._reading:
                size = self._chunk_bytes - len(self._pending)
                deadline = self._pending_since + self._flush_s if self._pending else math.inf
                with trio.CancelScope(deadline=deadline) as scope:
                    self._receive_scope = scope
                    data = await self._source.receive_some(size)
                self._receive_scope = None
                if scope.cancelled_caught:
                    if not self._reading:
                        return
                    await self._flush()  # the oldest pending byte reached the flush age
                    continue
                if not data:
                    return
                await self._take(data)
        finally:
            self._eof.set()

    async def wait_eof(self) -> None:
        await self._eof.wait()

    def stop_reading(self) -> None:
        self._reading = False
        if self._receive_scope is not None:
            self._receive_scope.cancel()

    async def finish(self) -> None:
        """Report what is still buffered, then the kept tail that was not reported live."""
        await self._flush()
        start = max(self._sent, self.total - self._tail.capacity)
        if start >= self.total:
            return
        tail = self._tail.last(self.total - start)
        for piece in range(0, len(tail), self._chunk_bytes):
            data = tail[piece : piece + self._chunk_bytes]
            await self._report.output(self._stream, start + piece, data)
        self._sent = self.total

    async def _take(self, data: bytes | bytearray) -> None:
        offset = self.total
        self.total += len(data)
        self._tail.add(data)
        live = data[: max(0, self._live_limit - offset)]
        if not live:
            return
        if not self._pending:
            self._pending_since = trio.current_time()
        self._pending += live
        if len(self._pending) >= self._chunk_bytes or len(live) < len(data):
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data = bytes(self._pending)
        self._pending.clear()
        offset, self._sent = self._sent, self._sent + len(data)
        await self._report.output(self._stream, offset, data)


class Tail:
    """The last ``capacity`` bytes of a stream, kept as the chunks they arrived in."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._chunks: deque[bytes | bytearray] = deque()
        self._size = 0

    def add(self, data: bytes | bytearray) -> None:
        if not self.capacity:
            return
        self._chunks.append(data)
        self._size += len(data)
        while self._size - len(self._chunks[0]) >= self.capacity:
            self._size -= len(self._chunks.popleft())

    def last(self, size: int) -> bytes:
        return b"".join(self._chunks)[-size:] if size else b""
