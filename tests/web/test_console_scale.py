"""2,000 hosts in one task: the console stays responsive. 2,000 simulated agents (real protocol
streams that answer each run at once: ``python -m bench.simagents``) carry a task started from
the form; the hosts page and the task page keep a bounded number of rows in the DOM whatever the
fleet's size, and the page never blocks its main thread for long (PerformanceObserver longtask)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import trio

from tests.e2e.cluster import AGENT_TOKEN, Cluster, Program
from tests.web.console import Console, in_browser, needs_chromium

pytestmark = [pytest.mark.web, pytest.mark.e2e, needs_chromium]

HOSTS = 2000
MAX_ROWS = 80  # rows in the DOM: a screenful and the overscan, never the whole list
LONGEST_TASK_MS = 1000  # generous: the work per event and per frame is small

WATCH_LONG_TASKS = """
window.__longTasks = [];
new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) window.__longTasks.push(entry.duration);
}).observe({ type: "longtask", buffered: true });
"""


async def online_count(cluster: Cluster) -> int:
    count, cursor = 0, None
    while True:
        query = "status=online&label=fleet=sim&limit=1000" + (f"&cursor={cursor}" if cursor else "")
        page = await cluster.get(f"/api/v1/hosts?{query}")
        count += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return count


async def test_two_thousand_hosts_stay_responsive(cluster: Cluster, tmp_path: Path) -> None:
    # heartbeats every 5 s (the e2e default of 0.5 s is for a few agents, not 2,000)
    await cluster.start_daemon("--heartbeat-interval-s", "5", "--heartbeat-ttl-s", "30")
    sim = Program("simagents", [
        sys.executable, "-m", "bench.simagents", "--server", f"127.0.0.1:{cluster.grpc_port}",
        "--token", AGENT_TOKEN, "--prefix", "sim", "--count", str(HOSTS), "--jitter-s", "3",
        "--label", "fleet=sim", "--heartbeat-s", "5",
    ], tmp_path / "simagents.log")  # fmt: skip
    cluster.agents["simagents"] = sim  # stopped with the cluster
    await sim.start()
    with trio.fail_after(120):
        while await online_count(cluster) < HOSTS:  # noqa: ASYNC110 (no event for it)
            await trio.sleep(0.5)

    def scenario(c: Console) -> None:
        page = c.page
        page.add_init_script(WATCH_LONG_TASKS)
        c.sign_in(route="/hosts")
        c.wait_text(".filters .summary", f"{HOSTS:,} hosts ({HOSTS:,} online)", timeout_ms=60_000)
        assert 10 < c.body_rows() <= MAX_ROWS
        page.eval_on_selector(".vtable", "el => { el.scrollTop = el.scrollHeight; }")
        page.wait_for_selector("tr[data-host='sim-01999']")
        assert c.body_rows() <= MAX_ROWS

        c.go("/tasks/new")
        page.fill("[data-field=name]", "two thousand")
        page.fill("[data-field='commands.0.script']", "echo hi")
        page.locator(".label-row input").nth(0).fill("fleet")
        page.locator(".label-row input").nth(1).fill("sim")
        page.wait_for_selector(f".target-count[data-count='{HOSTS}']", timeout=60_000)
        page.click("button:has-text('Create and start')")
        page.wait_for_selector(".task-name:has-text('two thousand')")
        page.wait_for_selector(".task-state .badge.s-completed", timeout=120_000)
        c.wait_text(".hosts-panel .summary", f"{HOSTS:,} of {HOSTS:,} executions", 60_000)
        done = f"{HOSTS:,} of {HOSTS:,} executions finished (100%)"
        assert page.inner_text(".progress-text") == done
        assert 10 < c.body_rows() <= MAX_ROWS
        c.shot("task-2000-hosts", full_page=False)

        # the table scrolls to its end, filters, and answers a click promptly
        page.eval_on_selector(".vtable", "el => { el.scrollTop = el.scrollHeight; }")
        page.wait_for_selector("tr[data-host='sim-01999']")
        assert c.body_rows() <= MAX_ROWS
        started = time.monotonic()
        page.fill("input[name=host]", "sim-0150")
        c.wait_rows(10)
        page.click(".counts [data-status='succeeded']")
        page.wait_for_selector(".counts [data-status='succeeded'][aria-pressed='true']")
        c.wait_rows(10)
        page.fill("input[name=host]", "")
        c.wait_text(".hosts-panel .summary", f"{HOSTS:,} of {HOSTS:,}")
        assert time.monotonic() - started < 10  # generous: each step is a frame or two
        page.click("tr[data-host='sim-00000'] button[data-open]")
        c.wait_text("pre.out.stdout", "hi")
        longest = max(page.evaluate("window.__longTasks"), default=0)
        assert longest < LONGEST_TASK_MS, f"the main thread was blocked for {longest:.0f} ms"

    await in_browser(cluster, tmp_path, scenario)
