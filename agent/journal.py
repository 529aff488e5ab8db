"""The agent's journal: every event until the daemon acknowledged it, and every CommandHost the
agent ever accepted, kept on disk under the state directory (format in ``journal_file``).

It is the single source of the agent's delivery state:
- a Run is *claimed* (durably) before its process is spawned, so a repeated Run, even after an
  agent restart, is never executed twice;
- every event is appended, with its per-CommandHost seq, before the sender may take it;
- the sender reads events through an outbox that ``rewind()`` refills with every unacknowledged
  event when a new stream starts, so replay and live events come out of one queue, in order;
- an Ack forgets the events it covers; a CommandHost whose Finished is acknowledged is only
  remembered as started.

Writes are group commits (``journal_writer``): one ``write()`` for whatever was appended while
the previous one ran, one ``fsync`` when a claim or a Finished event is among it. A failed write
(a full disk) is logged and retried with the state held in memory; the events still reach the
sender, so nothing is lost while the daemon is reachable.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent import journal_file as jf
from agent.journal_writer import Flush, JournalWriter
from agent.process_group import ProcessInfo
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

JOURNAL_NAME = "journal"


@dataclass(eq=False, slots=True)
class _Entry:
    position: int
    event: pb.Event
    size: int
    acked: bool = False
    released: bool = False  # its write was attempted: the sender may take it


@dataclass(eq=False, slots=True)
class _Command:
    next_seq: int = 1
    acked_seq: int = 0
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    process: ProcessInfo | None = None
    finished: bool = False
    unacked: deque[_Entry] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A CommandHost a previous agent accepted and never finished."""

    command_host_id: int
    started: bool
    process: ProcessInfo | None
    stdout_bytes: int
    stderr_bytes: int


@dataclass(frozen=True, slots=True)
class JournalStatistics:
    commands: int
    unacked_events: int
    unacked_bytes: int
    remembered: int
    file_bytes: int
    pending_records: int
    write_failures: int


class Journal:
    """Create with ``open_journal``."""

    def __init__(self, path: Path, *, fsync: bool, compact_bytes: int, remembered_ids: int):
        self._remembered_limit = remembered_ids
        self._remembered: OrderedDict[int, None] = OrderedDict()
        self._commands: dict[int, _Command] = {}
        self._entries: dict[int, _Entry] = {}  # unacknowledged, by position (append order)
        self._next_position = 0
        self._unacked_bytes = 0
        self._interrupted: list[Interrupted] = []
        self._outbox: deque[_Entry] = deque()
        self._outbox_changed = trio.Event()
        self._acked = trio.Event()
        self._writer = JournalWriter(
            path,
            fsync=fsync,
            compact_bytes=compact_bytes,
            snapshot=self._snapshot,
            live_bytes=self._live_bytes,
            on_written=self._release,
        )

    # ------------------------------------------------------------------ queries

    def is_remembered(self, command_host_id: int) -> bool:
        return command_host_id in self._commands or command_host_id in self._remembered

    def known_ids(self) -> list[int]:
        """Accepted and not finished, or finished with events not yet acknowledged."""
        return list(self._commands)

    def interrupted(self) -> list[Interrupted]:
        """What the previous agent left unfinished, as found when the journal was opened."""
        return list(self._interrupted)

    def statistics(self) -> JournalStatistics:
        return JournalStatistics(
            commands=len(self._commands),
            unacked_events=len(self._entries),
            unacked_bytes=self._unacked_bytes,
            remembered=len(self._remembered),
            file_bytes=self._writer.file_bytes,
            pending_records=self._writer.pending_records,
            write_failures=self._writer.write_failures,
        )

    # ------------------------------------------------------------------ appends

    async def claim(self, command_host_id: int) -> None:
        """Remember that this CommandHost was accepted; returns once that is on disk.

        Unlike an event, a claim waits through write retries: it is what keeps a restarted agent
        from running the command a second time.
        """
        if self.is_remembered(command_host_id):
            raise ValueError(f"command_host {command_host_id} was already claimed")
        self._remember(command_host_id)
        self._commands[command_host_id] = _Command()
        record = jf.encode(jf.Kind.CLAIM, jf.CLAIM.pack(command_host_id))
        await self._writer.wait_durable(self._writer.enqueue(record, sync=True))

    async def record_started(
        self, command_host_id: int, pid: int, process: ProcessInfo | None
    ) -> pb.Event:
        event = pb.Event(started=pb.Started(pid=pid))
        flush = self._append(command_host_id, event)
        if process is not None:
            self._commands[command_host_id].process = process
            record = jf.PROCESS.pack(command_host_id, process.pid, process.pgid, process.start_time)
            self._writer.enqueue(jf.encode(jf.Kind.PROCESS, record))
        await flush.done.wait()
        return event

    async def record_output(
        self, command_host_id: int, stream: pb.OutputStream, offset: int, data: bytes
    ) -> pb.Event:
        event = pb.Event(output=pb.Output(stream=stream, offset=offset, data=data))
        await self._append(command_host_id, event).done.wait()
        return event

    async def record_finished(self, command_host_id: int, finished: pb.Finished) -> pb.Event:
        event = pb.Event(finished=finished)
        await self._append(command_host_id, event, sync=True).done.wait()
        return event

    def ack(self, command_host_id: int, seq: int) -> None:
        """The daemon holds every event of this CommandHost up to ``seq``: forget them."""
        if self._apply_ack(command_host_id, seq):
            self._writer.enqueue(jf.encode(jf.Kind.ACK, jf.ACK.pack(command_host_id, seq)))
            self._acked.set()

    async def flush(self) -> None:
        """Until every record appended so far was written (or its write attempted)."""
        await self._writer.flush()

    # ------------------------------------------------------------------ sending

    def rewind(self) -> None:
        """Queue every unacknowledged event again (a new stream starts): replay, in order."""
        self._outbox = deque(entry for entry in self._entries.values() if entry.released)
        self._outbox_changed.set()

    async def next_batch(self, *, max_events: int, max_bytes: int) -> list[pb.Event]:
        """The next events to send: at least one (waits for it), within the given bounds."""
        while True:
            batch: list[pb.Event] = []
            size = 0
            while self._outbox and len(batch) < max_events:
                entry = self._outbox[0]
                if entry.acked:
                    self._outbox.popleft()
                    continue
                if batch and size + entry.size > max_bytes:
                    break
                self._outbox.popleft()
                batch.append(entry.event)
                size += entry.size
            if batch:
                return batch
            self._outbox_changed = trio.Event()
            await self._outbox_changed.wait()

    async def wait_acknowledged(self) -> None:
        """Until the daemon acknowledged every event appended so far."""
        while self._entries:
            self._acked = trio.Event()
            await self._acked.wait()

    # ------------------------------------------------------------------ state

    def _append(
        self, command_host_id: int, event: pb.Event, *, sync: bool = False
    ) -> Flush[_Entry]:
        command = self._commands.get(command_host_id)
        if command is None:
            raise KeyError(f"command_host {command_host_id} was not claimed")
        if command.finished:
            raise ValueError(f"command_host {command_host_id} already finished")
        event.command_host_id = command_host_id
        event.seq = command.next_seq
        event.monotonic_ns = time.monotonic_ns()
        data = bytes(event)
        entry = self._new_entry(event, len(data))
        # Enqueued first: a closed journal refuses before the state changes.
        flush = self._writer.enqueue(jf.encode(jf.Kind.EVENT, data), tag=entry, sync=sync)
        self._apply_event(command, entry)
        return flush

    def _new_entry(self, event: pb.Event, size: int) -> _Entry:
        self._next_position += 1
        return _Entry(self._next_position, event, size)

    def _apply_event(self, command: _Command, entry: _Entry) -> None:
        """How one event changes the state; shared by appending and by loading."""
        event = entry.event
        command.next_seq = max(command.next_seq, event.seq + 1)
        if event.output is not None:
            end = event.output.offset + len(event.output.data)
            if event.output.stream == pb.OutputStream.STDERR:
                command.stderr_bytes = max(command.stderr_bytes, end)
            else:
                command.stdout_bytes = max(command.stdout_bytes, end)
        if event.finished is not None:
            command.finished = True
        command.unacked.append(entry)
        self._entries[entry.position] = entry
        self._unacked_bytes += entry.size

    def _apply_ack(self, command_host_id: int, seq: int) -> bool:
        command = self._commands.get(command_host_id)
        if command is None or seq <= command.acked_seq:
            return False
        if seq >= command.next_seq:
            logger.warning(
                "command_host %d: ack for seq %d, but only %d events exist; ignoring the excess",
                command_host_id,
                seq,
                command.next_seq - 1,
            )
            seq = command.next_seq - 1
            if seq <= command.acked_seq:
                return False
        command.acked_seq = seq
        while command.unacked and command.unacked[0].event.seq <= seq:
            entry = command.unacked.popleft()
            entry.acked = True
            del self._entries[entry.position]
            self._unacked_bytes -= entry.size
        if command.finished and not command.unacked:
            del self._commands[command_host_id]
        return True

    def _remember(self, command_host_id: int) -> None:
        self._remembered[command_host_id] = None
        while len(self._remembered) > self._remembered_limit:
            self._remembered.popitem(last=False)

    def _release(self, entries: list[_Entry]) -> None:
        """Their records were written (or the write attempted): the sender may take them."""
        for entry in entries:
            entry.released = True
            if not entry.acked:
                self._outbox.append(entry)
        if entries:
            self._outbox_changed.set()

    def _live_bytes(self) -> int:
        return self._unacked_bytes + 8 * len(self._remembered) + 64 * len(self._commands)

    def _snapshot(self) -> bytes:
        parts = [jf.encode(jf.Kind.REMEMBERED, jf.encode_ids(self._remembered))]
        for command_host_id, command in self._commands.items():
            process = command.process or ProcessInfo(0, 0, 0)
            record = jf.COMMAND.pack(
                command_host_id,
                command.next_seq,
                command.acked_seq,
                command.stdout_bytes,
                command.stderr_bytes,
                process.pid,
                process.pgid,
                process.start_time,
                command.finished,
            )
            parts.append(jf.encode(jf.Kind.COMMAND, record))
        parts.extend(jf.encode(jf.Kind.EVENT, bytes(e.event)) for e in self._entries.values())
        return b"".join(parts)

    def _load(self, scan: jf.Scan) -> None:
        """Rebuild the state from the records of the previous run."""
        for kind, payload in scan.records:
            if kind is jf.Kind.CLAIM:
                (command_host_id,) = jf.CLAIM.unpack(payload)
                self._remember(command_host_id)
                self._commands.setdefault(command_host_id, _Command())
            elif kind is jf.Kind.EVENT:
                event = pb.Event.parse(payload)
                command = self._commands.setdefault(event.command_host_id, _Command())
                # A snapshot's COMMAND record already counts its unacknowledged events in
                # next_seq: only acknowledged ones, or copies of ones loaded, are to be skipped.
                newest = command.unacked[-1].event.seq if command.unacked else command.acked_seq
                if event.seq > newest:
                    entry = self._new_entry(event, len(payload))
                    entry.released = True
                    self._apply_event(command, entry)
            elif kind is jf.Kind.ACK:
                self._apply_ack(*jf.ACK.unpack(payload))
            elif kind is jf.Kind.PROCESS:
                command_host_id, pid, pgid, start_time = jf.PROCESS.unpack(payload)
                if command_host_id in self._commands:
                    self._commands[command_host_id].process = ProcessInfo(pid, pgid, start_time)
            elif kind is jf.Kind.COMMAND:
                (chid, next_seq, acked, out, err, pid, pgid, start, done) = jf.COMMAND.unpack(
                    payload
                )
                process = ProcessInfo(pid, pgid, start) if pid else None
                self._commands[chid] = _Command(next_seq, acked, out, err, process, bool(done))
            elif kind is jf.Kind.REMEMBERED:
                for command_host_id in jf.decode_ids(payload):
                    self._remember(command_host_id)
        self._interrupted = [
            Interrupted(chid, c.next_seq > 1, c.process, c.stdout_bytes, c.stderr_bytes)
            for chid, c in self._commands.items()
            if not c.finished
        ]


@asynccontextmanager
async def open_journal(
    directory: Path,
    *,
    fsync: bool = True,
    compact_bytes: int = 16 * 1024 * 1024,
    remembered_ids: int = 100_000,
    close_timeout_s: float = 10.0,
) -> AsyncIterator[Journal]:
    """The journal in ``directory`` (created if needed), its state rebuilt, its writer running.

    On exit every record handed to it is written and synced, within ``close_timeout_s``.
    """
    lock_fd = await trio.to_thread.run_sync(jf.lock_directory, directory)
    try:
        path = directory / JOURNAL_NAME
        scan = await trio.to_thread.run_sync(jf.scan, path)
        if scan.dropped_bytes:
            logger.warning(
                "journal %s: dropped an unreadable tail of %d bytes after %d records "
                "(an interrupted write)",
                path,
                scan.dropped_bytes,
                len(scan.records),
            )
        journal = Journal(
            path, fsync=fsync, compact_bytes=compact_bytes, remembered_ids=remembered_ids
        )
        journal._load(scan)
        writer = journal._writer
        await writer.start(scan.valid_bytes)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.serve)
                try:
                    yield journal
                finally:
                    writer.close(close_timeout_s)
        finally:
            with trio.CancelScope(shield=True):
                await writer.aclose_file()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.close, lock_fd)
