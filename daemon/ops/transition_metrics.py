"""Counters and histograms of executions, from the writer's committed batches.

``TransitionMetrics.serve`` reads the writer's commit feed (``store.commits``): the committed
record of every execution whose status changed in a batch (once per change: an execution that
moved twice in one batch comes twice, both times as it ended the batch), and turns each into a
few additions (no lock: it runs in the trio thread, and ``/metrics`` reads it there too). What it
measures:

- executions finished, by final status (since the daemon started);
- dispatch latency: ``dispatched_at`` -> ``started_at``, once per execution that started;
- execution duration (the agent's measurement), by final status;
- commit lag: from a state change (``dispatched_at``, ``started_at`` or ``finished_at``, on the
  daemon's clock) to the commit that recorded it: agent -> daemon delivery, the writer's queue
  and the transaction together;
- output bytes the commands wrote, by stream, counted when they finish.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Sequence

import trio

from daemon.states import EXEC_TERMINAL, ExecStatus
from daemon.store.commits import Committed
from daemon.store.ledger import Execution

LATENCY_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BOUNDS_S = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0)
LAG_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FINAL_STATUSES = tuple(s for s in ExecStatus if s in EXEC_TERMINAL)


class Buckets:
    """A histogram's buckets: ``counts[i]`` values <= ``bounds[i]``, the last one the rest."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ending with ``+Inf``."""
        pairs, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return pairs


class TransitionMetrics:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._since = clock()
        self.finished: dict[str, int] = {status.value: 0 for status in FINAL_STATUSES}
        self.dispatch_latency = Buckets(LATENCY_BOUNDS_S)
        self.duration = {status.value: Buckets(DURATION_BOUNDS_S) for status in FINAL_STATUSES}
        self.commit_lag = Buckets(LAG_BOUNDS_S)
        self.output_bytes = {"stdout": 0, "stderr": 0}
        self._started: set[int] = set()  # running executions whose latency was counted

    async def serve(
        self,
        commits: trio.MemoryReceiveChannel[Committed],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        async with commits:
            async for committed in commits:
                if committed.transitions:
                    executions = committed.executions
                    self([executions[ch_id] for ch_id, _, _ in committed.transitions])

    def __call__(self, moved: Sequence[Execution]) -> None:
        now = self._clock()
        seen: set[int] = set()
        for ex in moved:
            if ex.id in seen:
                continue
            seen.add(ex.id)
            status = ex.status
            if ex.started_at is not None and ex.id not in self._started:
                self._note_start(ex)
            if status.terminal:
                self.finished[status.value] += 1
                self._started.discard(ex.id)
                if ex.duration_s is not None:
                    self.duration[status.value].observe(ex.duration_s)
                self.output_bytes["stdout"] += ex.stdout_bytes
                self.output_bytes["stderr"] += ex.stderr_bytes
                moment = ex.finished_at
            elif status == ExecStatus.RUNNING:
                moment = ex.started_at
            else:
                moment = ex.dispatched_at
            if moment is not None:
                self.commit_lag.observe(max(0.0, now - moment))

    def _note_start(self, ex: Execution) -> None:
        """Count the dispatch latency of an execution seen started for the first time, unless
        it started before this daemon did (its latency belongs to the previous run)."""
        assert ex.started_at is not None
        if ex.dispatched_at is None or ex.started_at < self._since:
            return
        self.dispatch_latency.observe(max(0.0, ex.started_at - ex.dispatched_at))
        if not ex.status.terminal:
            self._started.add(ex.id)
