"""``/metrics``: the daemon's components' ``statistics()`` in Prometheus text format.

Values are read when Prometheus scrapes, so the hot paths carry no metric bookkeeping of their
own beyond the counters their ``statistics()`` already keep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


class DaemonCollector(Collector):
    def __init__(self, sources: dict[str, Callable[[], Any]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = {name: read() for name, read in self._sources.items()}
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


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def metrics_renderer(sources: dict[str, Callable[[], Any]]) -> Callable[[], bytes]:
    registry = CollectorRegistry()
    registry.register(DaemonCollector(sources))
    return lambda: generate_latest(registry)
