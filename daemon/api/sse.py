"""The live event stream of one task, as Server-Sent Events (``GET /api/v1/tasks/{id}/events``).

Events (``event:`` the kind, ``data:`` one JSON object, ``id:`` a change sequence number):
- ``task``: ``{"id", "status", "started_at", "finished_at", "error"}``;
- ``execution``: an execution as ``GET /executions/{id}`` shows it, without output;
- ``output``: ``{"execution_id", "host_id", "stream", "offset", "bytes", "omitted_bytes",
  "text"}``: ``bytes`` of the stream from ``offset``, decoded as UTF-8 (with replacement) by one
  decoder per execution and stream, so a character split between chunks arrives whole; bytes the
  store dropped show up as ``omitted_bytes`` and a ``[... N bytes omitted ...]`` line in ``text``;
- ``progress``: as in ``GET /tasks/{id}``;
- ``end``: ``{"status"}`` after the task's final state; the server then closes the stream, and a
  client should not reconnect;
- ``error``: ``{"error": {"code", "message"}}`` when the stream cannot go on.
A ``: keepalive`` comment goes out when nothing happened for a while.

Without ``Last-Event-ID`` the stream starts with the task's current ``task`` and ``progress``.
With it, the stream first replays from the database every change after that id (the rows as
they are now, in sequence order) and one ``progress``. Either way it subscribes to the live hub
*before* reading the database, then drops live events the read already covered, so nothing falls
between the two. The writer publishes each batch at once and not necessarily in sequence order:
the stream takes everything that is waiting and sends it sorted, so the ids a client sees only
grow and a reconnect with the last one misses nothing and repeats nothing. A watcher cut off by
the hub for being slow (``lagged``) drops what it holds of the unfinished batch, reads the
database again from its last id and subscribes again.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import trio

from daemon.api import catch_up
from daemon.api.live import LiveEvent, LiveHub
from daemon.states import TASK_TERMINAL, ExecStatus
from daemon.store.database import Database
from daemon.store.queries import omitted_marker

logger = logging.getLogger(__name__)

KEEPALIVE = b": keepalive\n\n"


def frame(kind: str, data: Any, event_id: int | None) -> bytes:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"id: {event_id}\n" if event_id is not None else ""
    # a lone surrogate (only from bad stored text) becomes a \udXXX escape: still valid JSON
    return f"{head}event: {kind}\ndata: {text}\n\n".encode("utf-8", "backslashreplace")


def error_frame(code: str, message: str) -> bytes:
    return frame("error", {"error": {"code": code, "message": message}}, None)


@dataclass
class EventStreamStatistics:
    open: int
    limit: int


class EventStreams:
    """The open event streams: at most ``max_streams``, and ended together at shutdown."""

    def __init__(self, max_streams: int) -> None:
        self.limiter = trio.CapacityLimiter(max_streams)
        self.closing = False
        self._waits: set[trio.CancelScope] = set()

    def full(self) -> bool:
        return self.limiter.available_tokens == 0

    def close_all(self) -> None:
        """Stop every stream at its next wait (clients reconnect to the next daemon)."""
        self.closing = True
        for scope in list(self._waits):
            scope.cancel()

    def statistics(self) -> EventStreamStatistics:
        return EventStreamStatistics(
            open=self.limiter.borrowed_tokens, limit=int(self.limiter.total_tokens)
        )


@dataclass
class _Decoding:
    decoder: codecs.IncrementalDecoder
    next_offset: int


@dataclass
class _Renderer:
    """Turns events into frames, dropping what the client already has (by sequence number)."""

    include_output: bool
    last_id: int = 0  # every change up to here has been sent
    final_status: str | None = None
    _streams: dict[tuple[str, str], _Decoding] = field(default_factory=dict)

    def render(self, event: LiveEvent) -> list[bytes]:
        if event.kind == "progress":
            # a progress older than what was sent is stale; its id stays the last change sent
            return (
                [frame("progress", event.data, self.last_id)] if event.seq >= self.last_id else []
            )
        if event.seq <= self.last_id or (event.kind == "output" and not self.include_output):
            return []
        frames: list[bytes] = []
        data = event.data
        if event.kind == "output":
            data = self._output(data)
        elif event.kind == "execution":
            frames.extend(self._flush_execution(data))
        elif event.kind == "task" and data.get("status") in TASK_TERMINAL:
            self.final_status = data["status"]
        try:
            frames.append(frame(event.kind, data, event.seq))
        except (TypeError, ValueError):
            logger.error("task %s: live event %s of kind %r is not JSON", event.task_id,
                         event.seq, event.kind)  # fmt: skip
            return frames
        self.last_id = event.seq
        return frames

    def _output(self, data: dict[str, Any]) -> dict[str, Any]:
        execution_id, stream = str(data["execution_id"]), data["stream"]
        raw, offset = bytes(data["data"]), int(data["offset"])
        state = self._streams.get((execution_id, stream))
        if state is None:
            state = _Decoding(codecs.getincrementaldecoder("utf-8")("replace"), offset)
            self._streams[(execution_id, stream)] = state
        text = ""
        omitted = 0
        if offset < state.next_offset:  # overlaps what was sent: send only the new bytes
            raw = raw[state.next_offset - offset :]
            offset = state.next_offset
        elif offset > state.next_offset:  # the store dropped bytes in between
            omitted = offset - state.next_offset
            text = state.decoder.decode(b"", True) + omitted_marker(omitted)
            state.decoder.reset()
        text += state.decoder.decode(raw)
        state.next_offset = offset + len(raw)
        return {
            "execution_id": execution_id,
            "host_id": data["host_id"],
            "stream": stream,
            "offset": offset,
            "bytes": len(raw),
            "omitted_bytes": omitted,
            "text": text,
        }

    def _flush_execution(self, data: dict[str, Any]) -> list[bytes]:
        """An execution that ended has no more output: what its decoders hold (the start of a
        character that never finished) goes out as a replacement character."""
        status = data.get("status")
        if status not in ExecStatus.__members__.values() or not ExecStatus(status).terminal:
            return []
        frames = []
        for stream in ("stdout", "stderr"):
            state = self._streams.pop((str(data["id"]), stream), None)
            rest = state.decoder.decode(b"", True) if state is not None else ""
            if state is not None and rest:
                frames.append(frame("output", {
                    "execution_id": str(data["id"]), "host_id": data.get("host_id"),
                    "stream": stream, "offset": state.next_offset, "bytes": 0,
                    "omitted_bytes": 0, "text": rest,
                }, self.last_id))  # fmt: skip
        return frames


class _Closed(Exception):
    """The hub closed the subscription (it fell behind); what was drained is incomplete."""


async def _next_group(
    receive: trio.MemoryReceiveChannel[LiveEvent], timeout_s: float, streams: EventStreams
) -> list[LiveEvent] | None:
    """Everything waiting (whole batches), sorted by seq with progress last; None after
    ``timeout_s`` of quiet or when the daemon is closing."""
    with trio.move_on_after(timeout_s) as scope:
        streams._waits.add(scope)
        try:
            first = await receive.receive()
        except trio.EndOfChannel:
            raise _Closed from None
        finally:
            streams._waits.discard(scope)
    if scope.cancelled_caught:
        return None
    group = [first]
    while True:
        try:
            group.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
        except trio.EndOfChannel:
            raise _Closed from None
    group.sort(key=lambda event: (event.seq, event.kind == "progress"))
    return group


async def task_events(
    *,
    database: Database,
    live: LiveHub,
    streams: EventStreams,
    task_id: int,
    last_event_id: int | None,
    include_output: bool,
    keepalive_s: float,
    replay_batch: int,
) -> AsyncIterator[bytes]:
    """The stream's body; see the module docstring. The caller checked that the task exists."""
    token = object()
    try:
        streams.limiter.acquire_on_behalf_of_nowait(token)
    except trio.WouldBlock:
        yield error_frame("unavailable", "too many open event streams; try again later")
        return
    try:
        renderer = _Renderer(include_output=include_output)
        resume = last_event_id
        while not streams.closing:
            with live.subscribe(task_id) as subscription:
                if resume is None:
                    snapshot = await database.read(catch_up.task_snapshot, task_id)
                    if snapshot is None:
                        return
                    renderer.last_id = snapshot.seq
                    yield frame("task", snapshot.task, snapshot.seq)
                    yield frame("progress", snapshot.progress, snapshot.seq)
                    status = snapshot.task["status"]
                else:
                    renderer.last_id = resume
                    while True:
                        before = renderer.last_id
                        batch = await database.read(
                            _changes_since, task_id, renderer.last_id, replay_batch, include_output
                        )
                        if batch is None:
                            return
                        for event in batch.events:
                            for chunk in renderer.render(event):
                                yield chunk
                        if batch.complete or renderer.last_id == before:
                            break
                    if batch.progress is not None:
                        yield frame("progress", batch.progress, renderer.last_id)
                    status = batch.task["status"]
                if status in TASK_TERMINAL:
                    yield frame("end", {"status": status}, renderer.last_id)
                    return
                while True:
                    try:
                        group = await _next_group(subscription.receive, keepalive_s, streams)
                    except _Closed:
                        break
                    if group is None:
                        if streams.closing:
                            return
                        yield KEEPALIVE
                        continue
                    for event in group:
                        for chunk in renderer.render(event):
                            yield chunk
                    if renderer.final_status is not None:
                        yield frame("end", {"status": renderer.final_status}, renderer.last_id)
                        return
                if not subscription.lagged:
                    return
                logger.info(
                    "task %s: event stream fell behind at %d; catching up from the database",
                    task_id,
                    renderer.last_id,
                )
                resume = renderer.last_id
    except Exception:
        logger.exception("task %s: the event stream failed", task_id)
        yield error_frame("internal", "the event stream failed; reconnect to resume")
    finally:
        streams.limiter.release_on_behalf_of(token)


def _changes_since(
    task_id: int, after_seq: int, limit: int, include_output: bool
) -> catch_up.Changes | None:
    return catch_up.changes_since(task_id, after_seq, limit, include_output=include_output)
