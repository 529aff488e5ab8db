"""/metrics: execution counters and histograms from committed transitions, tasks by status from
the database, every family with its help text (the end-to-end scrape is in
tests/e2e/test_operations_e2e.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon.ops.metrics import Metrics
from daemon.ops.transition_metrics import Buckets, TransitionMetrics
from daemon.states import ExecStatus
from daemon.store.database import Database
from daemon.store.ledger import Execution
from daemon.store.retention import Pruned, RetentionStatistics
from tests.daemon.conftest import Rows

T0 = 1_800_000_000.0


def ex(ch_id: int, status: ExecStatus, **values: Any) -> Execution:
    return Execution(id=ch_id, task_id=1, host_id=f"h{ch_id}", command_index=0, status=status,
                     **values)  # fmt: skip


def test_buckets_are_cumulative_with_inf_last() -> None:
    buckets = Buckets((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        buckets.observe(value)
    assert buckets.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert (buckets.count, buckets.sum) == (4, 7.65)


def test_transitions_count_each_start_once_and_finished_output() -> None:
    clock = [T0]
    metrics = TransitionMetrics(clock=lambda: clock[0])
    clock[0] = T0 + 10
    metrics([ex(1, ExecStatus.DISPATCHED, dispatched_at=T0 + 1),
             ex(2, ExecStatus.DISPATCHED, dispatched_at=T0 + 1)])  # fmt: skip
    metrics([ex(1, ExecStatus.RUNNING, dispatched_at=T0 + 1, started_at=T0 + 1.25)])
    # 2 went from dispatched to finished within one batch (the writer names it once per
    # change); 1 finishes later
    failed = ex(
        2,
        ExecStatus.FAILED,
        dispatched_at=T0 + 1,
        started_at=T0 + 1.5,
        finished_at=T0 + 9,
        duration_s=7.5,
        stdout_bytes=10,
        stderr_bytes=3,
    )
    metrics([
        failed, failed,
        ex(1, ExecStatus.SUCCEEDED, dispatched_at=T0 + 1, started_at=T0 + 1.25,
           finished_at=T0 + 9.5, duration_s=8.0, stdout_bytes=6),
        # started before this daemon did: its latency was counted by the previous one
        ex(3, ExecStatus.SUCCEEDED, dispatched_at=T0 - 5, started_at=T0 - 4, finished_at=T0 + 2,
           duration_s=6.0),
    ])  # fmt: skip
    assert metrics.finished == {"succeeded": 2, "failed": 1, "timed_out": 0, "cancelled": 0,
                                "dispatch_failed": 0, "skipped": 0}  # fmt: skip
    assert (metrics.dispatch_latency.count, metrics.dispatch_latency.sum) == (2, 0.75)
    assert metrics.duration["succeeded"].count == 2 and metrics.duration["failed"].sum == 7.5
    assert metrics.output_bytes == {"stdout": 16, "stderr": 3}
    # lags: 9, 9 (dispatched), 8.75 (running), 1, 0.5, 8 (finished)
    assert (metrics.commit_lag.count, metrics.commit_lag.sum) == (6, 36.25)
    assert metrics._started == set()  # nothing left behind once they finished


def sources(**extra: Any) -> dict[str, Any]:
    stats = {
        "registry": SimpleNamespace(connected=2, arrivals=3, replaced=0),
        "writer": SimpleNamespace(queued=1, batches=4, ops=10, events=8, duplicates=0, refused=0,
                                  output_rows=2, failures=0, last_batch_size=3,
                                  last_flush_s=0.01),
        "dispatcher": SimpleNamespace(executions_in_flight=1, executions_waiting_for_slot=0,
                                      executions_running_limit=1000),
        "scheduler": SimpleNamespace(running=1, max_running=20),
        "live": SimpleNamespace(subscriptions=0),
        "database": SimpleNamespace(errors=0, reads_running=1, reads_waiting=0,
                                    writes_waiting=2),
        "retention": RetentionStatistics(days=30, passes=1, failures=0, last_pass_s=0.1,
                                         deleted=Pruned(tasks=4, executions=8)),
        **extra,
    }  # fmt: skip
    return {name: (lambda value=value: value) for name, value in stats.items()}


async def test_every_family_is_rendered_with_help_and_tasks_by_status(
    database: Database, rows: Rows
) -> None:
    for status in ("completed", "completed", "failed", "running"):
        rows.task(status=status)
    transitions = TransitionMetrics()
    metrics = Metrics(sources(), database=database, transitions=transitions)
    await metrics.refresh()
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert all(f.documentation for f in families.values())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}  # fmt: skip
    assert {status: samples[("dispatch_tasks", (("status", status),))] for status in
            ("pending", "queued", "running", "completed", "failed", "cancelled")} == {
        "pending": 0, "queued": 0, "running": 1, "completed": 2, "failed": 1, "cancelled": 0,
    }  # fmt: skip
    assert samples[("dispatch_retention_deleted_total", (("kind", "tasks"),))] == 4
    assert samples[("dispatch_database_writes_waiting", ())] == 2
    assert samples[("dispatch_writer_ops_total", ())] == 10
    assert samples[("dispatch_dispatch_latency_seconds_count", ())] == 0
    assert {"dispatch_executions_finished", "dispatch_execution_duration_seconds",
            "dispatch_commit_lag_seconds", "dispatch_output_bytes", "dispatch_tasks_limit",
            "dispatch_agents_connected", "dispatch_writer_queue"} <= set(families)  # fmt: skip

    rows.task(status="failed")  # counted again only after TASK_COUNT_INTERVAL_S
    await metrics.refresh()
    again = metrics.render().decode()
    assert 'dispatch_tasks{status="failed"} 1.0' in again
