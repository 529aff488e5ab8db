"""Group commit of journal records to one file, in a worker thread.

Whatever is enqueued while a write is running goes out with the next one: one ``write()`` and at
most one ``fsync`` for many records, so a hundred commands finishing together share one sync.
The writer also rewrites the file (compaction) from a snapshot the journal provides, which
replaces every record still pending, and does the same to recover after a failed write.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import trio

from agent import journal_file as jf

logger = logging.getLogger(__name__)

TagT = TypeVar("TagT")

_RETRY_MAX_S = 30.0


class Flush(Generic[TagT]):
    """One group commit: the records enqueued while the previous one was being written."""

    __slots__ = ("records", "tags", "sync", "done", "ok", "retry")

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.tags: list[TagT] = []  # handed back to ``on_written`` once the write was attempted
        self.sync = False
        self.done = trio.Event()
        self.ok = False
        self.retry: Flush[TagT] | None = None  # where the records went after a failed write


class JournalWriter(Generic[TagT]):
    """Writes records for ``Journal``; ``TagT`` is what it hands back to ``on_written`` for the
    records enqueued with a tag."""

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool,
        compact_bytes: int,
        snapshot: Callable[[], bytes],
        live_bytes: Callable[[], int],
        on_written: Callable[[list[TagT]], None],
    ) -> None:
        self.path = path
        self._fsync = fsync
        self._compact_bytes = compact_bytes
        self._snapshot = snapshot
        self._live_bytes = live_bytes
        self._on_written = on_written
        self._fd = -1
        self.file_bytes = 0
        self.write_failures = 0
        self._needs_rewrite = False
        self._current: Flush[TagT] = Flush()
        self._in_flight: Flush[TagT] | None = None
        self._wake = trio.Event()
        self._closing = False
        self._closed = False
        self._scope: trio.CancelScope | None = None

    @property
    def pending_records(self) -> int:
        return len(self._current.records)

    def enqueue(self, record: bytes, *, tag: TagT | None = None, sync: bool = False) -> Flush[TagT]:
        if self._closed:
            raise trio.ClosedResourceError(f"journal {self.path} is closed")
        flush = self._current
        flush.records.append(record)
        if tag is not None:
            flush.tags.append(tag)
        flush.sync = flush.sync or (sync and self._fsync)
        self._wake.set()
        return flush

    async def wait_durable(self, flush: Flush[TagT] | None) -> None:
        """Until the records of ``flush`` are written, following them through retries."""
        while flush is not None:
            await flush.done.wait()
            flush = None if flush.ok else flush.retry

    async def flush(self) -> None:
        """Until every record enqueued so far was written (or its write attempted)."""
        target = self._current if self._current.records else self._in_flight
        if target is not None:
            await target.done.wait()

    async def start(self, valid_bytes: int) -> None:
        """Begin with a compacted file; fall back to appending after ``valid_bytes``."""
        self.file_bytes = valid_bytes
        try:
            await self._rewrite()
        except OSError as exc:
            logger.error("journal %s: cannot compact at start (%s); appending", self.path, exc)
            self._fd = await trio.to_thread.run_sync(jf.open_for_append, self.path, valid_bytes)
            self.file_bytes = max(valid_bytes, len(jf.MAGIC))

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Shielded: records already handed out must reach the disk even while everything around
        # is being cancelled; ``close`` ends this loop by deadline instead.
        with trio.CancelScope(shield=True) as self._scope:
            task_status.started()
            failures = 0
            while True:
                flush = self._current
                if not flush.records:
                    if self._closing:
                        self._closed = True
                        return
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                self._current = Flush()
                self._in_flight = flush
                try:
                    await self._write(flush)
                except OSError as exc:
                    failures += 1
                    self.write_failures += 1
                    self._needs_rewrite = True
                    delay = min(_RETRY_MAX_S, 0.5 * 2**failures)
                    logger.error(
                        "journal %s: write failed (%s); %d records held in memory and events "
                        "still sent to the daemon; retrying in %.1f s",
                        self.path,
                        exc,
                        len(flush.records),
                        delay,
                    )
                    retry = self._current
                    retry.records[:0] = flush.records
                    retry.sync = retry.sync or flush.sync
                    flush.retry = retry
                    self._finish(flush, ok=False)
                    await self._release_while_failing(delay)
                    continue
                if failures:
                    logger.warning(
                        "journal %s: writing again after %d failures", self.path, failures
                    )
                failures = 0
                self._finish(flush, ok=True)

    def close(self, timeout_s: float) -> None:
        """Write what is pending (synced), then stop; give up after ``timeout_s``."""
        self._closing = True
        self._current.sync = self._current.sync or self._fsync
        self._wake.set()
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + timeout_s)

    async def aclose_file(self) -> None:
        if self._current.records:
            logger.error(
                "journal %s: closed with %d records unwritten",
                self.path,
                len(self._current.records),
            )
        fd, self._fd = self._fd, -1
        if fd >= 0:
            await trio.to_thread.run_sync(os.close, fd)

    async def _release_while_failing(self, delay_s: float) -> None:
        """Until the next write attempt, hand what is appended meanwhile to the sender at once:
        the disk is failing, but the daemon may still take it. The records stay queued for the
        retry (each released flush points to the one holding them)."""
        with trio.move_on_after(delay_s):
            while True:
                self._wake = trio.Event()
                await self._wake.wait()
                if self._closing:
                    return
                pending = self._current
                if not pending.tags:
                    continue
                following: Flush[TagT] = Flush()
                following.records, pending.records = pending.records, []
                following.sync = pending.sync
                pending.retry = following
                self._current = following
                self._finish(pending, ok=False)

    def _finish(self, flush: Flush[TagT], *, ok: bool) -> None:
        self._in_flight = None
        flush.ok = ok
        self._on_written(flush.tags)
        flush.done.set()

    async def _write(self, flush: Flush[TagT]) -> None:
        if self._needs_rewrite or self._should_compact():
            await self._rewrite()
            return
        data = b"".join(flush.records)
        await trio.to_thread.run_sync(self._append_sync, data, flush.sync)
        self.file_bytes += len(data)

    def _append_sync(self, data: bytes, sync: bool) -> None:
        try:
            jf.append(self._fd, data, sync=sync)
        except OSError:
            try:
                jf.truncate(self._fd, self.file_bytes)
            except OSError:
                pass  # the rewrite that follows every failure replaces the file anyway
            raise

    def _should_compact(self) -> bool:
        if not self._compact_bytes or self.file_bytes < self._compact_bytes:
            return False
        return self.file_bytes > 2 * self._live_bytes()

    async def _rewrite(self) -> None:
        """Replace the file with a snapshot of the state, which subsumes every pending record."""
        records = self._snapshot()
        old_fd, self._fd = self._fd, -1
        try:
            self._fd = await trio.to_thread.run_sync(
                lambda: jf.rewrite(self.path, records, sync=self._fsync)
            )
        finally:
            if old_fd >= 0:
                await trio.to_thread.run_sync(os.close, old_fd)
        new_bytes = len(jf.MAGIC) + len(records)
        logger.debug("journal %s: rewritten, %d -> %d bytes", self.path, self.file_bytes, new_bytes)
        self.file_bytes = new_bytes
        self._needs_rewrite = False
