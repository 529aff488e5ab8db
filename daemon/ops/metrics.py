"""``/metrics``: the daemon's components' ``statistics()`` in Prometheus text format.

Values are read when Prometheus scrapes, so the hot paths carry no metric bookkeeping of their
own beyond the counters their ``statistics()`` already keep. Two sources are not ``statistics()``:
execution counters and histograms (``TransitionMetrics``, reading the writer's commits)
and tasks by status, a ``COUNT`` by status through ``Database.read`` made at scrape time, at most
once every ``TASK_COUNT_INTERVAL_S`` (``Metrics.refresh``, awaited by the route before
rendering).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from peewee import SQL, fn
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from daemon.ops.transition_metrics import Buckets, TransitionMetrics
from daemon.states import TaskStatus
from daemon.store.database import Database
from daemon.store.models import Task

TASK_COUNT_INTERVAL_S = 5.0
Family = GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily


def task_counts() -> dict[str, int]:
    """Tasks by status (through ``Database.read``; the ``task.status`` index answers it)."""
    rows = Task.select(Task.status, fn.COUNT(SQL("*"))).group_by(Task.status).tuples()
    return {status: count for status, count in rows}


class DaemonCollector(Collector):
    def __init__(
        self,
        sources: dict[str, Callable[[], Any]],
        transitions: TransitionMetrics | None = None,
        tasks: Callable[[], dict[str, int] | None] | None = None,
    ) -> None:
        self._sources = sources
        self._transitions = transitions
        self._tasks = tasks

    def collect(self) -> Iterator[Family]:
        s = {name: read() for name, read in self._sources.items()}
        yield from self._components(s)
        if self._transitions is not None:
            yield from _transitions(self._transitions)
        counts = self._tasks() if self._tasks is not None else None
        if counts is not None:
            family = GaugeMetricFamily("dispatch_tasks", "tasks by status", labels=["status"])
            for status in TaskStatus:
                family.add_metric([status.value], counts.get(status.value, 0))
            yield family

    def _components(self, s: dict[str, Any]) -> Iterator[Family]:
        registry, writer, dispatcher = s["registry"], s["writer"], s["dispatcher"]
        yield _gauge("dispatch_agents_connected", "agents with a live stream", registry.connected)
        yield _counter("dispatch_agent_connects", "agent streams accepted", registry.arrivals)
        yield _counter("dispatch_agent_replaced", "streams replaced by a newer one from the same "
                       "host", registry.replaced)  # fmt: skip
        yield _gauge("dispatch_tasks_running", "tasks being run", s["scheduler"].running)
        yield _gauge(
            "dispatch_executions_in_flight",
            "executions being followed",
            dispatcher.executions_in_flight,
        )
        yield _gauge("dispatch_executions_waiting_for_slot", "executions waiting for the "
                     "daemon-wide limit", dispatcher.executions_waiting_for_slot)  # fmt: skip
        yield _gauge(
            "dispatch_executions_limit",
            "daemon-wide execution limit",
            dispatcher.executions_running_limit,
        )
        yield _gauge("dispatch_writer_queue", "changes waiting for the writer", writer.queued)
        yield _counter("dispatch_writer_batches", "transactions written", writer.batches)
        yield _counter("dispatch_writer_events", "agent events received", writer.events)
        yield _counter(
            "dispatch_writer_duplicate_events", "agent events already stored", writer.duplicates
        )
        yield _counter("dispatch_writer_refused_events", "agent events refused", writer.refused)
        yield _counter("dispatch_writer_output_rows", "output chunks stored", writer.output_rows)
        yield _counter("dispatch_writer_failures", "failed transactions (retried)", writer.failures)
        yield _gauge(
            "dispatch_writer_last_batch_size",
            "changes in the last transaction",
            writer.last_batch_size,
        )
        yield _gauge(
            "dispatch_writer_last_flush_seconds",
            "duration of the last transaction",
            writer.last_flush_s,
        )
        yield _gauge("dispatch_live_watchers", "live event subscriptions", s["live"].subscriptions)
        yield _counter(
            "dispatch_database_errors", "database calls that failed", s["database"].errors
        )
        if "audit" in s:
            audit = s["audit"]
            yield _counter("dispatch_audit_events", "audit events written", audit.recorded)
            yield _counter("dispatch_audit_denials_dropped", "denials not written to the audit "
                           "log (too many at once)", audit.denials_dropped)  # fmt: skip
            yield _counter("dispatch_audit_failures", "audit writes that failed", audit.failures)
        db = s["database"]
        yield _gauge("dispatch_database_reads_in_use", "database read threads busy "
                     "(--db-read-threads)", db.reads_running)  # fmt: skip
        yield _gauge("dispatch_database_reads_waiting", "reads waiting for a thread",
                     db.reads_waiting)  # fmt: skip
        yield _gauge("dispatch_database_writes_waiting", "transactions waiting for the write "
                     "lane (the writer's batches, retention)", db.writes_waiting)  # fmt: skip
        yield _gauge("dispatch_tasks_limit", "tasks allowed to run at once (--max-running-tasks)",
                     s["scheduler"].max_running)  # fmt: skip
        yield _counter("dispatch_writer_ops", "changes written (a batch holds many)", writer.ops)
        if "retention" in s:
            retention = s["retention"]
            deleted = CounterMetricFamily(
                "dispatch_retention_deleted", "rows deleted by the retention pass", labels=["kind"]
            )
            for kind, count in vars(retention.deleted).items():
                deleted.add_metric([kind], count)
            yield deleted
            yield _counter("dispatch_retention_passes", "retention passes run", retention.passes)
            yield _counter("dispatch_retention_failures", "retention passes a database error "
                           "stopped", retention.failures)  # fmt: skip


def _transitions(t: TransitionMetrics) -> Iterator[Family]:
    finished = CounterMetricFamily(
        "dispatch_executions_finished", "executions finished, by final status", labels=["status"]
    )
    for status, count in t.finished.items():
        finished.add_metric([status], count)
    yield finished
    yield _histogram("dispatch_dispatch_latency_seconds", "from an execution's dispatch to the "
                     "agent starting its process", t.dispatch_latency)  # fmt: skip
    duration = HistogramMetricFamily(
        "dispatch_execution_duration_seconds",
        "how long finished executions ran (the agent's measurement), by final status",
        labels=["status"],
    )
    for status, buckets in t.duration.items():
        duration.add_metric([status], buckets.cumulative(), buckets.sum)
    yield duration
    yield _histogram("dispatch_commit_lag_seconds", "from an execution's state change to the "
                     "writer's commit recording it", t.commit_lag)  # fmt: skip
    output = CounterMetricFamily(
        "dispatch_output_bytes", "bytes finished commands wrote (stored or not)", labels=["stream"]
    )
    for stream, count in t.output_bytes.items():
        output.add_metric([stream], count)
    yield output


def _histogram(name: str, documentation: str, buckets: Buckets) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=buckets.cumulative(), sum_value=buckets.sum
    )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


class Metrics:
    """The daemon's ``/metrics``: ``await refresh()`` (the task counts), then ``render()``."""

    def __init__(
        self,
        sources: dict[str, Callable[[], Any]],
        *,
        database: Database,
        transitions: TransitionMetrics,
        task_count_interval_s: float = TASK_COUNT_INTERVAL_S,
    ) -> None:
        self._database = database
        self._interval_s = task_count_interval_s
        self._task_counts: dict[str, int] | None = None
        self._counted_at = -float("inf")
        self._registry = CollectorRegistry()
        self._registry.register(
            DaemonCollector(sources, transitions, tasks=lambda: self._task_counts)
        )

    async def refresh(self) -> None:
        if time.monotonic() - self._counted_at >= self._interval_s:
            self._counted_at = time.monotonic()
            self._task_counts = await self._database.read(task_counts)

    def render(self) -> bytes:
        return generate_latest(self._registry)
