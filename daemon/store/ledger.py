"""The authoritative state of executions that have not finished, and how changes become a plan.

Every change to a CommandHost goes through here, in the writer's order: agent events, the
dispatcher's decisions (dispatched, settled without the agent's word), and cancel reasons. The
ledger keeps the live executions in memory (loading one from the database the first time it is
touched), so deciding a transition is a dictionary lookup, not a conditional UPDATE per row:

- transitions only move forward (``EXEC_RANK``); a terminal state never changes again;
- agent events are applied once, in order, by (command_host_id, seq): a duplicate is ignored but
  acknowledged, a gap is refused unacknowledged (the agent replays it), an event from a host
  other than the execution's own is refused and logged;
- output is stored per stream as the head (first half of the limit) and a tail that is pruned to
  the second half as newer output arrives; ``dropped`` counts what was not kept.

``plan`` works on copies and never touches the cache; the writer calls ``commit`` only after the
plan's transaction committed, so a failed write is retried from the same state.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import betterproto2

from daemon.states import EXEC_RANK, ExecStatus, Reason
from daemon.store.agent_events import malformed, outcome_of
from daemon.store.write_ops import (
    AckSink,
    AgentEvents,
    MarkDispatched,
    NoteCancel,
    Op,
    Settle,
    TaskChange,
)
from proto.dispatch import v1 as pb

logger = logging.getLogger(__name__)

STDOUT, STDERR = 1, 2
_RECENTLY_DONE = 20_000  # finished executions remembered, so late replays need no database read
# Settled by the daemon without the agent's word: the agent may still deliver output it holds,
# which is stored (the decision itself stands).
SETTLED_WITHOUT_AGENT = frozenset({Reason.AGENT_LOST, Reason.DAEMON_RESTART})


@dataclass(slots=True)
class StreamState:
    stored_end: int = 0  # bytes of the stream up to here were either stored or dropped
    kept: int = 0  # bytes stored
    tail_rows: deque[tuple[int, int]] = field(default_factory=deque)  # (offset, size) past head
    hasher: Any = field(default_factory=hashlib.sha256)  # None: digest computed from the rows

    def clone(self) -> StreamState:
        return StreamState(
            self.stored_end,
            self.kept,
            deque(self.tail_rows),
            self.hasher.copy() if self.hasher is not None else None,
        )


@dataclass(slots=True)
class Execution:
    id: int
    task_id: int
    host_id: str
    command_index: int
    status: ExecStatus
    reason: str | None = None
    error: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    pid: int | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    output_truncated: bool = False
    output_digest: str | None = None
    last_seq: int = 0
    change_seq: int = 0
    cancel_reason: Reason | None = None
    streams: dict[int, StreamState] = field(default_factory=dict)

    def clone(self) -> Execution:
        twin = copy.copy(self)
        twin.streams = {k: v.clone() for k, v in self.streams.items()}
        return twin

    def view_row(self) -> dict[str, Any]:
        """The columns ``views.execution_view`` renders."""
        return {name: getattr(self, name) for name in ROW_FIELDS}


ROW_FIELDS = (
    "id", "task_id", "command_index", "host_id", "status", "reason", "error", "exit_code",
    "signal", "pid", "dispatched_at", "started_at", "finished_at", "duration_s", "stdout_bytes",
    "stderr_bytes", "output_truncated", "output_digest", "last_seq", "change_seq",
)  # fmt: skip
# What the writer updates, in this order, followed by the id.
UPDATE_FIELDS = tuple(
    f for f in ROW_FIELDS if f not in ("id", "task_id", "command_index", "host_id")
)


@dataclass
class Plan:
    """What one batch changes: written in one transaction, then committed to the cache."""

    first_seq: int
    next_seq: int
    work: dict[int, Execution] = field(default_factory=dict)  # every copy, merged on commit
    changed: dict[int, Execution] = field(default_factory=dict)  # the rows to write
    status_changes: list[tuple[int, ExecStatus, str | None]] = field(default_factory=list)
    output_rows: list[tuple[int, int, int, int, int, bytes, int]] = field(default_factory=list)
    pruned_rows: list[tuple[int, int, int]] = field(default_factory=list)  # (ch, stream, offset)
    digests_from_rows: list[Execution] = field(default_factory=list)
    acks: dict[AckSink, dict[int, int]] = field(default_factory=dict)
    task_changes: list[tuple[TaskChange, int]] = field(default_factory=list)  # with change_seq
    refused: int = 0
    duplicates: int = 0

    def take_seq(self) -> int:
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def ack(self, sink: AckSink, ch_id: int, seq: int) -> None:
        acks = self.acks.setdefault(sink, {})
        if seq > acks.get(ch_id, 0):
            acks[ch_id] = seq


Loader = Callable[[Sequence[int]], dict[int, Execution]]


class Ledger:
    def __init__(self, *, max_output_bytes: int, next_seq: int) -> None:
        self.head_bytes = max_output_bytes // 2
        self.tail_bytes = max_output_bytes - self.head_bytes
        self._next_seq = next_seq
        self._active: dict[int, Execution] = {}
        self._done: OrderedDict[int, Execution] = OrderedDict()

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def active_count(self) -> int:
        return len(self._active)

    def unknown_ids(self, ops: Iterable[Op]) -> list[int]:
        """Executions the ops touch that the ledger holds neither live nor recently finished."""
        wanted: set[int] = set()
        for op in ops:
            if isinstance(op, AgentEvents):
                wanted.update(e.command_host_id for e, _ in op.events if malformed(e) is None)
            elif isinstance(op, MarkDispatched | Settle | NoteCancel):
                wanted.update(op.ids)
        return [i for i in wanted if i not in self._active and i not in self._done]

    def plan(self, ops: Sequence[Op], loaded: Mapping[int, Execution]) -> Plan:
        """Decide what ``ops`` change, without touching the cache. ``loaded`` holds the
        executions ``unknown_ids`` asked the database for (missing ones do not exist)."""
        return _Planner(self, loaded).run(ops)

    def commit(self, plan: Plan) -> None:
        self._next_seq = plan.next_seq
        for ex in plan.work.values():
            if ex.status.terminal:
                self._active.pop(ex.id, None)
                if ex.reason not in SETTLED_WITHOUT_AGENT:
                    ex.streams = {}  # the hashers and tail bookkeeping are no longer needed
                self._done[ex.id] = ex
                self._done.move_to_end(ex.id)
                while len(self._done) > _RECENTLY_DONE:
                    self._done.popitem(last=False)
            else:
                self._active[ex.id] = ex

    def lookup(self, ch_id: int) -> Execution | None:
        return self._active.get(ch_id) or self._done.get(ch_id)


class _Planner:
    def __init__(self, ledger: Ledger, loaded: Mapping[int, Execution]) -> None:
        self.ledger = ledger
        self.loaded = loaded
        self.plan = Plan(first_seq=ledger.next_seq, next_seq=ledger.next_seq)

    def run(self, ops: Sequence[Op]) -> Plan:
        for op in ops:
            if isinstance(op, AgentEvents):
                self.agent_events(op)
            elif isinstance(op, MarkDispatched):
                for ch_id in op.ids:
                    ex = self.get(ch_id)
                    if ex is not None and ex.status == ExecStatus.PENDING:
                        ex.dispatched_at = op.at
                        self.move(ex, ExecStatus.DISPATCHED, None)
            elif isinstance(op, Settle):
                for ch_id in op.ids:
                    ex = self.get(ch_id)
                    if ex is not None and not ex.status.terminal:
                        self.settle(ex, op)
            elif isinstance(op, NoteCancel):
                for ch_id in op.ids:
                    ex = self.get(ch_id)
                    if ex is not None and not ex.status.terminal:
                        ex.cancel_reason = op.reason  # remembered, not stored
            else:
                self.plan.task_changes.append((op, self.plan.take_seq()))
        return self.plan

    def get(self, ch_id: int) -> Execution | None:
        """The working copy of an execution (None if it does not exist)."""
        ex = self.plan.work.get(ch_id)
        if ex is None:
            source = self.ledger.lookup(ch_id) or self.loaded.get(ch_id)
            if source is None:
                return None
            ex = self.plan.work[ch_id] = source.clone()
        return ex

    def move(self, ex: Execution, status: ExecStatus, reason: str | None) -> None:
        if EXEC_RANK[status] < EXEC_RANK[ex.status] or ex.status.terminal:
            return
        ex.status = status
        ex.reason = reason
        self.touch(ex)
        self.plan.status_changes.append((ex.id, status, reason))

    def touch(self, ex: Execution) -> None:
        ex.change_seq = self.plan.take_seq()
        self.plan.changed[ex.id] = ex

    # -------------------------------------------------------------- agent events

    def agent_events(self, op: AgentEvents) -> None:
        for event, at in op.events:
            problem = malformed(event)
            if problem is not None:
                self.plan.refused += 1
                logger.warning("host %s: event refused: %s", op.host_id, problem)
                continue
            ch_id, seq = event.command_host_id, event.seq
            ex = self.get(ch_id)
            if ex is None or ex.host_id != op.host_id:
                self.plan.refused += 1
                logger.warning(
                    "host %s reported execution %s, which %s; ignored",
                    op.host_id, ch_id, "does not exist" if ex is None else "is not its own",
                )  # fmt: skip
                continue
            if seq <= ex.last_seq:
                self.plan.duplicates += 1
                self.plan.ack(op.sink, ch_id, ex.last_seq)
                continue
            if seq != ex.last_seq + 1 or ex.status == ExecStatus.PENDING:
                self.plan.refused += 1
                logger.warning(
                    "host %s execution %s: event seq %s refused (stored up to %s, status %s)",
                    op.host_id, ch_id, seq, ex.last_seq, ex.status,
                )  # fmt: skip
                continue
            ex.last_seq = seq
            self.plan.ack(op.sink, ch_id, seq)
            kind, value = betterproto2.which_one_of(event, "kind")
            if ex.status.terminal:
                # Already decided (e.g. settled while the agent was away): the decision stands,
                # but output the command wrote meanwhile is still part of the record.
                if kind == "output" and ex.reason in SETTLED_WITHOUT_AGENT:
                    self.output(ex, value, seq)
                    self.digest(ex)
                continue
            self.plan.changed.setdefault(ex.id, ex)  # last_seq is written even if nothing else
            if kind == "started":
                ex.pid = value.pid or None
                ex.started_at = at
                self.move(ex, ExecStatus.RUNNING, None)
            elif kind == "output":
                self.output(ex, value, seq)
            elif kind == "finished":
                self.finished(ex, value, at)
            else:
                logger.warning(
                    "host %s execution %s: event seq %s carries nothing", op.host_id, ch_id, seq
                )

    def output(self, ex: Execution, output: pb.Output, seq: int) -> None:
        stream = int(output.stream)
        if stream not in (STDOUT, STDERR):
            logger.warning("execution %s: output for unknown stream %s ignored", ex.id, stream)
            return
        state = ex.streams.setdefault(stream, StreamState())
        data, offset = bytes(output.data), output.offset
        end = offset + len(data)
        if end > state.stored_end:
            start = max(offset, state.stored_end)
            piece = data[start - offset :]
            state.stored_end = end
            state.kept += len(piece)
            if state.hasher is not None:
                state.hasher.update(piece)
            head = self.ledger.head_bytes
            # A chunk across the head's end is stored as two rows, so the head is exactly the
            # first half of the limit and the tail can be pruned row by row.
            cut = head - start if start < head < end else len(piece)
            for part_start, part in ((start, piece[:cut]), (start + cut, piece[cut:])):
                if not part:
                    continue
                change_seq = self.plan.take_seq()
                self.plan.output_rows.append(
                    (ex.id, ex.task_id, stream, part_start, len(part), part, change_seq)
                )
                if part_start >= head:
                    state.tail_rows.append((part_start, len(part)))
            self.prune(ex, stream, state)
        total = max(ex.stdout_bytes if stream == STDOUT else ex.stderr_bytes, end)
        if stream == STDOUT:
            ex.stdout_bytes = total
        else:
            ex.stderr_bytes = total
        ex.output_truncated = ex.output_truncated or state.kept < state.stored_end
        self.touch(ex)

    def prune(self, ex: Execution, stream: int, state: StreamState) -> None:
        keep_from = state.stored_end - self.ledger.tail_bytes
        rows = state.tail_rows
        while rows and rows[0][0] + rows[0][1] <= keep_from:
            offset, size = rows.popleft()
            state.kept -= size
            self.plan.pruned_rows.append((ex.id, stream, offset))

    def finished(self, ex: Execution, finished: pb.Finished, at: float) -> None:
        status, reason, error = outcome_of(finished, ex.cancel_reason)
        ex.exit_code = finished.exit_code if finished.has_exit_code else None
        ex.signal = finished.signal or None
        ex.error = finished.error or error or None
        ex.finished_at = at
        if ex.started_at is not None:
            ex.duration_s = finished.duration_ns / 1e9
        ex.stdout_bytes = max(ex.stdout_bytes, finished.stdout_bytes)
        ex.stderr_bytes = max(ex.stderr_bytes, finished.stderr_bytes)
        self.finish(ex, status, reason)

    def settle(self, ex: Execution, op: Settle) -> None:
        ex.error = op.error
        ex.finished_at = op.at
        if ex.started_at is not None:
            ex.duration_s = max(0.0, op.at - ex.started_at)
        self.finish(ex, op.status, op.reason)

    def finish(self, ex: Execution, status: ExecStatus, reason: Reason) -> None:
        kept = {s: ex.streams.get(s, StreamState()).kept for s in (STDOUT, STDERR)}
        ex.output_truncated = ex.stdout_bytes > kept[STDOUT] or ex.stderr_bytes > kept[STDERR]
        self.move(ex, status, reason)
        self.digest(ex)

    def digest(self, ex: Execution) -> None:
        hashers = [ex.streams.get(s, StreamState()).hasher for s in (STDOUT, STDERR)]
        if any(h is None for h in hashers):
            if all(queued is not ex for queued in self.plan.digests_from_rows):
                self.plan.digests_from_rows.append(ex)  # loaded mid-run: hash the stored rows
        else:
            ex.output_digest = output_digest(ex, *(h.digest() for h in hashers))


def output_digest(ex: Execution, stdout_hash: bytes, stderr_hash: bytes) -> str:
    """Equal for executions that ended the same way with the same output."""
    head = f"{ex.status}|{ex.reason}|{ex.exit_code}|{ex.signal}|".encode()
    return hashlib.sha256(head + stdout_hash + stderr_hash).hexdigest()
