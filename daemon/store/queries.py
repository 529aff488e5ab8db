"""Reads for the HTTP API: hosts, tasks, executions and their stored output.

Every function here is synchronous and runs in a reader thread (``await database.read(fn, ...)``);
each returns records already rendered by ``store.views``. Lists cost a fixed number of queries
whatever their length (no query per row) and page with keyset cursors over indexed columns.

Orders and time ranges (``since`` inclusive, ``until`` exclusive, epoch seconds):
- tasks: newest first (id descending); the range filters on ``created_at``;
- executions of a task: id ascending (command by command, hosts in creation order);
- executions across tasks (audit): newest first (id descending);
- for executions the range filters on ``started_at``: executions that never started have none,
  so they are left out whenever ``since`` or ``until`` is given;
- hosts: by id.

Cursors are opaque: the position, the kind of list and a digest of the filters, with a checksum.
A damaged cursor, or one from another list or other filters, is a 400 (``InvalidRequest``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from peewee import SQL, fn

from daemon.errors import InvalidRequest
from daemon.identifiers import HOST_ID
from daemon.store import views
from daemon.store.models import Command, CommandHost, Host, HostConnection, OutputChunk, Task

STREAMS = {"stdout": 1, "stderr": 2}


@dataclass(frozen=True)
class Page:
    items: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True)
class TaskFilter:
    statuses: tuple[str, ...] = ()
    host: str | None = None
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until


@dataclass(frozen=True)
class ExecutionFilter:
    task_id: int | None = None  # None: across all tasks (audit)
    statuses: tuple[str, ...] = ()
    host: str | None = None
    since: float | None = None  # started_at >= since
    until: float | None = None  # started_at < until


# --- cursors --------------------------------------------------------------------------------

_CURSOR_KEY = b"dispatchd-cursor-v1"


def _digest(text: str, size: int) -> str:
    return hashlib.blake2b(text.encode(), key=_CURSOR_KEY, digest_size=size).hexdigest()


def encode_cursor(kind: str, filters: object, position: int | str) -> str:
    payload = json.dumps([kind, _digest(repr(filters), 6), position], separators=(",", ":"))
    token = f"{payload}|{_digest(payload, 8)}".encode()
    return base64.urlsafe_b64encode(token).decode().rstrip("=")


def decode_cursor(cursor: str | None, kind: str, filters: object) -> Any:
    """The position a cursor holds, or None without a cursor."""
    if cursor is None:
        return None
    try:
        token = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        payload, _, check = token.rpartition("|")
        if not hmac.compare_digest(check, _digest(payload, 8)):
            raise ValueError("checksum")
        cursor_kind, filter_digest, position = json.loads(payload)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidRequest("cursor is not a cursor this API gave out", field="cursor") from None
    if cursor_kind != kind or filter_digest != _digest(repr(filters), 6):
        raise InvalidRequest(
            "cursor belongs to another list or other filters: page with the same filters",
            field="cursor",
        )
    return position


def _int_position(position: Any) -> int | None:
    if position is None:
        return None
    if isinstance(position, int) and not isinstance(position, bool) and 0 <= position < 2**63:
        return position
    raise InvalidRequest("cursor is not a cursor this API gave out", field="cursor")


# --- hosts ----------------------------------------------------------------------------------

_HOST_FIELDS = (
    "id", "hostname", "labels", "status", "agent_version", "address", "first_seen_at",
    "connected_at", "last_seen_at", "enrollment",
)  # fmt: skip
_HOST_COLUMNS = [getattr(Host, name) for name in _HOST_FIELDS]


def list_hosts(
    status: str | None,
    labels: dict[str, str],
    limit: int,
    cursor: str | None,
    enrollment: str | None = None,
) -> Page:
    """Hosts by id; ``labels``: every one must match (filtered here: labels are JSON text);
    ``enrollment``: pending, approved, rejected or revoked."""
    filters: tuple[Any, ...] = (status, tuple(sorted(labels.items())))
    if enrollment is not None:  # cursors from before this filter existed stay valid
        filters += (enrollment,)
    after = decode_cursor(cursor, "hosts", filters)
    if after is not None and (not isinstance(after, str) or HOST_ID.fullmatch(after) is None):
        raise InvalidRequest("cursor is not a cursor this API gave out", field="cursor")
    query = Host.select(*_HOST_COLUMNS).order_by(Host.id)
    if status is not None:
        query = query.where(Host.status == status)
    if enrollment is not None:
        query = query.where(Host.enrollment == enrollment)
    if after is not None:
        query = query.where(Host.id > after)
    items: list[dict[str, Any]] = []
    more = False
    for values in query.tuples().iterator():
        row = dict(zip(_HOST_FIELDS, values, strict=True))
        view = views.host_view(row)
        if labels and any(view["labels"].get(k) != v for k, v in labels.items()):
            continue
        if len(items) == limit:
            more = True
            break
        items.append(view)
    next_cursor = encode_cursor("hosts", filters, items[-1]["id"]) if more else None
    return Page(items, next_cursor)


def get_host(host_id: str, connections: int) -> dict[str, Any] | None:
    row = Host.select(*_HOST_COLUMNS).where(Host.id == host_id).tuples().first()
    if row is None:
        return None
    host = views.host_view(dict(zip(_HOST_FIELDS, row, strict=True)))
    history = (
        HostConnection.select()
        .where(HostConnection.host_id == host_id)
        .order_by(HostConnection.id.desc())
        .limit(connections)
        .dicts()
    )
    host["connections"] = [views.connection_view(c) for c in history]
    return host


# --- tasks ----------------------------------------------------------------------------------

_COMMAND_FIELDS = ("task_id", "index", "script", "args", "env", "cwd", "timeout_s")
_COMMAND_COLUMNS = [
    Command.task, Command.index, Command.script, Command.args, Command.env, Command.cwd,
    Command.timeout_s,
]  # fmt: skip


def _render_tasks(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks with their commands and progress: three queries for any number of tasks."""
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    commands: dict[int, list[dict[str, Any]]] = {task_id: [] for task_id in ids}
    query = (
        Command.select(*_COMMAND_COLUMNS)
        .where(Command.task.in_(ids))
        .order_by(Command.task, Command.index)
    )
    for values in query.tuples():
        commands[values[0]].append(dict(zip(_COMMAND_FIELDS, values, strict=True)))
    counts: dict[int, dict[str, int]] = {task_id: {} for task_id in ids}
    query = (
        CommandHost.select(CommandHost.task, CommandHost.status, fn.COUNT(SQL("*")))
        .where(CommandHost.task.in_(ids))
        .group_by(CommandHost.task, CommandHost.status)
    )
    for task_id, status, count in query.tuples():
        counts[task_id][status] = count
    items = []
    for row in rows:
        view = views.task_view(row, commands[row["id"]])
        view["progress"] = views.progress_view(counts[row["id"]])
        items.append(view)
    return items


def get_task(task_id: int) -> dict[str, Any] | None:
    row = Task.select().where(Task.id == task_id).dicts().first()
    return _render_tasks([row])[0] if row is not None else None


def task_exists(task_id: int) -> bool:
    return Task.select(Task.id).where(Task.id == task_id).exists()


def progress_counts(task_id: int) -> dict[str, int]:
    """CommandHost status -> count for one task (the (task, status) index answers it alone)."""
    query = (
        CommandHost.select(CommandHost.status, fn.COUNT(SQL("*")))
        .where(CommandHost.task == task_id)
        .group_by(CommandHost.status)
    )
    return dict(query.tuples())


def list_tasks(filters: TaskFilter, limit: int, cursor: str | None) -> Page:
    """Newest first; ``since``/``until`` filter on created_at; ``host``: tasks with an execution
    on that host."""
    before = _int_position(decode_cursor(cursor, "tasks", filters))
    query = Task.select().order_by(Task.id.desc()).limit(limit + 1)
    if filters.statuses:
        query = query.where(Task.status.in_(filters.statuses))
    if filters.host is not None:
        on_host = CommandHost.select(CommandHost.task).where(CommandHost.host_id == filters.host)
        query = query.where(Task.id.in_(on_host))
    if filters.since is not None:
        query = query.where(Task.created_at >= filters.since)
    if filters.until is not None:
        query = query.where(Task.created_at < filters.until)
    if before is not None:
        query = query.where(Task.id < before)
    rows = list(query.dicts())
    more = len(rows) > limit
    items = _render_tasks(rows[:limit])
    next_cursor = encode_cursor("tasks", filters, rows[limit - 1]["id"]) if more else None
    return Page(items, next_cursor)


# --- executions -----------------------------------------------------------------------------

EXECUTION_COLUMNS = [
    CommandHost.task if name == "task_id" else getattr(CommandHost, name)
    for name in views.EXECUTION_FIELDS
]


def _execution_rows(query: Any) -> Iterator[dict[str, Any]]:
    for values in query.tuples():
        yield dict(zip(views.EXECUTION_FIELDS, values, strict=True))


def list_executions(filters: ExecutionFilter, limit: int, cursor: str | None) -> Page | None:
    """A task's executions by id, or (``task_id`` None) all executions newest first. ``since``/
    ``until`` filter on started_at. None when the task does not exist."""
    if filters.task_id is not None and not task_exists(filters.task_id):
        return None
    position = _int_position(decode_cursor(cursor, "executions", filters))
    newest_first = filters.task_id is None
    order = CommandHost.id.desc() if newest_first else CommandHost.id
    query = CommandHost.select(*EXECUTION_COLUMNS).order_by(order).limit(limit + 1)
    if filters.task_id is not None:
        query = query.where(CommandHost.task == filters.task_id)
    if filters.statuses:
        query = query.where(CommandHost.status.in_(filters.statuses))
    if filters.host is not None:
        query = query.where(CommandHost.host_id == filters.host)
    if filters.since is not None:
        query = query.where(CommandHost.started_at >= filters.since)
    if filters.until is not None:
        query = query.where(CommandHost.started_at < filters.until)
    if position is not None:
        query = query.where(
            CommandHost.id < position if newest_first else CommandHost.id > position
        )
    rows = list(_execution_rows(query))
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor("executions", filters, rows[-1]["id"]) if more else None
    return Page([views.execution_view(row) for row in rows], next_cursor)


# --- stored output --------------------------------------------------------------------------


def omitted_marker(count: int) -> str:
    return f"\n[... {count} bytes omitted ...]\n"


@dataclass(frozen=True)
class StoredOutput:
    """One stream of one execution as stored: ``data`` is the stored bytes in stream order,
    ``ranges`` the [start, end) byte ranges of the stream they cover, ``total_bytes`` what the
    process wrote (stored or not)."""

    data: bytes
    ranges: tuple[tuple[int, int], ...]
    total_bytes: int

    @property
    def omitted_bytes(self) -> int:
        return self.total_bytes - len(self.data)

    def text(self) -> str:
        """UTF-8 with replacement; each gap becomes a visible ``[... N bytes omitted ...]``."""
        parts: list[str] = []
        position = read = 0
        for start, end in self.ranges:
            if start > position:
                parts.append(omitted_marker(start - position))
            parts.append(self.data[read : read + end - start].decode("utf-8", "replace"))
            read += end - start
            position = end
        if self.total_bytes > position:
            parts.append(omitted_marker(self.total_bytes - position))
        return "".join(parts)


def assemble_output(chunks: Iterable[tuple[int, bytes]], total_bytes: int) -> StoredOutput:
    """Stored chunks (offset, data), in any order, to one stream. Rows may overlap (bytes
    already covered are dropped) or leave gaps (the head and the tail of a capped stream)."""
    ranges: list[list[int]] = []
    pieces: list[bytes] = []
    covered = 0
    for offset, data in sorted(chunks, key=lambda chunk: chunk[0]):
        end = offset + len(data)
        if end <= covered or not data:
            continue
        if offset < covered:
            data, offset = data[covered - offset :], covered
        if ranges and ranges[-1][1] == offset:
            ranges[-1][1] = end
        else:
            ranges.append([offset, end])
        pieces.append(data)
        covered = end
    return StoredOutput(
        data=b"".join(pieces),
        ranges=tuple((start, end) for start, end in ranges),
        total_bytes=max(total_bytes, covered),
    )


def _outputs(execution_id: int, streams: Sequence[int]) -> dict[int, list[tuple[int, bytes]]]:
    chunks: dict[int, list[tuple[int, bytes]]] = {stream: [] for stream in streams}
    query = (
        OutputChunk.select(OutputChunk.stream, OutputChunk.offset, OutputChunk.data)
        .where(OutputChunk.command_host == execution_id, OutputChunk.stream.in_(list(streams)))
        .order_by(OutputChunk.stream, OutputChunk.offset, OutputChunk.id)
    )
    for stream, offset, data in query.tuples():
        chunks[stream].append((offset, bytes(data)))
    return chunks


def _execution_row(execution_id: int) -> dict[str, Any] | None:
    query = CommandHost.select(*EXECUTION_COLUMNS).where(CommandHost.id == execution_id)
    return next(_execution_rows(query), None)


def get_execution(execution_id: int) -> dict[str, Any] | None:
    """The execution with its stored stdout and stderr as text (gaps marked)."""
    row = _execution_row(execution_id)
    if row is None:
        return None
    view = views.execution_view(row)
    chunks = _outputs(execution_id, (1, 2))
    for name, stream in STREAMS.items():
        output = assemble_output(chunks[stream], row[f"{name}_bytes"])
        view[name] = output.text()
        view[f"{name}_omitted_bytes"] = output.omitted_bytes
    return view


def execution_output(execution_id: int, stream: str) -> StoredOutput | None:
    row = _execution_row(execution_id)
    if row is None:
        return None
    number = STREAMS[stream]
    return assemble_output(_outputs(execution_id, (number,))[number], row[f"{stream}_bytes"])
