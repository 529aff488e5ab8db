"""Operations end to end: /metrics scraped from the real daemon after a task ran, and its JSON
log lines naming the task, host and execution (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.cluster import Cluster

pytestmark = pytest.mark.e2e


async def test_metrics_after_a_small_task_and_json_logs_with_ids(cluster: Cluster) -> None:
    cluster.extra_daemon_args = ["--log-json", "--retention-days", "30"]
    await cluster.start_daemon()
    await cluster.start_agents("m1", "m2")
    task_id = await cluster.run_task(["m1", "m2"], "printf 'hello\\n'; printf 'e' >&2")
    failed_id = await cluster.run_task(["m1"], "exit 3")
    assert (await cluster.wait_task(task_id))["status"] == "completed"
    assert (await cluster.wait_task(failed_id))["status"] == "failed"

    response = await cluster.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert all(family.documentation for family in families.values())
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}  # fmt: skip

    def by(name: str, **labels: str) -> float:
        return value[(name, tuple(sorted(labels.items())))]

    assert by("dispatch_agents_connected") == 2
    assert {s: by("dispatch_tasks", status=s) for s in ("completed", "failed", "running")} == {
        "completed": 1, "failed": 1, "running": 0}  # fmt: skip
    assert by("dispatch_executions_finished_total", status="succeeded") == 2
    assert by("dispatch_executions_finished_total", status="failed") == 1
    assert by("dispatch_dispatch_latency_seconds_count") == 3
    assert 0 < by("dispatch_dispatch_latency_seconds_sum") < 30
    assert by("dispatch_execution_duration_seconds_count", status="succeeded") == 2
    assert by("dispatch_execution_duration_seconds_count", status="failed") == 1
    assert by("dispatch_execution_duration_seconds_bucket", status="succeeded", le="+Inf") == 2
    assert by("dispatch_output_bytes_total", stream="stdout") == 12
    assert by("dispatch_output_bytes_total", stream="stderr") == 2
    # each start and each finish; each dispatch unless its start shared its batch
    assert 6 <= by("dispatch_commit_lag_seconds_count") <= 9
    assert by("dispatch_retention_passes_total") == 1
    assert by("dispatch_retention_deleted_total", kind="tasks") == 0
    assert by("dispatch_writer_queue") == 0 and by("dispatch_database_errors_total") == 0
    assert by("dispatch_tasks_limit") == 20 and by("dispatch_executions_limit") == 1000

    assert cluster.daemon is not None
    lines = [json.loads(line) for line in cluster.daemon.log_text().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    ends = [line for line in lines if line["message"].startswith(f"task {failed_id} failed")]
    assert len(ends) == 1 and ends[0]["task_id"] == failed_id
    connects = [line for line in lines if line["message"].startswith("host m1 connected")]
    assert connects and connects[0]["host_id"] == "m1"
