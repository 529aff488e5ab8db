"""The one way trio code reaches the database: a worker thread, under a limiter.

peewee is synchronous and its connections are per thread, so each call runs in a trio worker
thread inside ``connection_context()`` (a pooled connection, returned afterwards). Writes share a
limiter of one: SQLite has a single writer and serialising them here avoids busy-waiting in the
driver. Calls are not abandoned when the caller is cancelled: a write that has begun finishes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import peewee
import trio

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DatabaseStatistics:
    reads_running: int
    reads_waiting: int
    writes_running: int
    writes_waiting: int
    errors: int


class Database:
    def __init__(self, db: peewee.Database, *, read_threads: int) -> None:
        self.db = db
        self._read_limiter = trio.CapacityLimiter(read_threads)
        self._write_limiter = trio.CapacityLimiter(1)
        self.errors = 0

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a reader thread with a connection open."""
        call = functools.partial(self._call, fn, args, kwargs)
        return await trio.to_thread.run_sync(call, limiter=self._read_limiter)

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the writer thread with a connection open; ``fn`` opens
        its own transaction (``db.atomic()``)."""
        call = functools.partial(self._call, fn, args, kwargs)
        return await trio.to_thread.run_sync(call, limiter=self._write_limiter)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        try:
            with self.db.connection_context():
                return fn(*args, **kwargs)
        except peewee.DatabaseError:
            self.errors += 1
            raise

    def statistics(self) -> DatabaseStatistics:
        reads, writes = self._read_limiter.statistics(), self._write_limiter.statistics()
        return DatabaseStatistics(
            reads_running=reads.borrowed_tokens,
            reads_waiting=reads.tasks_waiting,
            writes_running=writes.borrowed_tokens,
            writes_waiting=writes.tasks_waiting,
            errors=self.errors,
        )
