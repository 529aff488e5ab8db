"""The benchmark scenarios. Each function runs ONE round in fresh processes and returns its
measurements as a flat dict of numbers; ``bench.__main__`` repeats rounds and summarises.

Timing of a fan-out: the client notes its wall clock just before the HTTP call that starts the
task; the daemon stamps the task's ``finished_at`` once every result is durable (it decides the
final status from the committed rows). Same machine, same clock: the difference is the time from
the start call to the last result durable, with no polling error.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import (
    TERMINAL,
    Daemon,
    Fleet,
    agent_argv,
    cpu_s,
    free_port,
    rss_mib,
    sim_fleet_argv,
    workdir,
)

Result = dict[str, float]


def _epoch(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _processes_for(n: int) -> int:
    return 1 if n <= 1000 else min(4, (n + 2499) // 2500)


def _start_fleet(daemon: Daemon, n: int, prefix: str = "sim", *extra: str) -> Fleet:
    fleet = Fleet()
    processes = _processes_for(n)
    per = (n + processes - 1) // processes
    for index in range(processes):
        count = min(per, n - index * per)
        fleet.start(sim_fleet_argv(daemon, prefix, index * per, count, *extra))
    return fleet


def _fan_out(daemon: Daemon, targets: dict[str, Any], *, probe_api: bool = False) -> Result:
    """Create a task, start it, wait for its end; timing and daemon CPU per host-job."""
    task = daemon.run_task(targets)
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:  # the progress call an operator's page makes, as often as it can
        while not done.is_set():
            began = time.perf_counter()
            try:
                daemon.api("GET", f"/api/v1/tasks/{task['id']}")
            except (urllib.error.URLError, TimeoutError):
                continue
            latencies.append(time.perf_counter() - began)

    cpu_before = cpu_s(daemon.pid)
    prober = threading.Thread(target=probe, daemon=True)
    started = time.time()
    daemon.api("POST", f"/api/v1/tasks/{task['id']}/start")
    if probe_api:
        prober.start()
    final = {}

    def finished() -> bool:
        nonlocal final
        final = daemon.api("GET", f"/api/v1/tasks/{task['id']}")
        return final["status"] in TERMINAL

    daemon.wait_until(finished, 600, "the fan-out", poll_s=0.05)
    done.set()
    cpu = cpu_s(daemon.pid) - cpu_before
    total = final["progress"]["total"]
    succeeded = final["progress"]["by_status"].get("succeeded", 0)
    if succeeded != total:
        raise RuntimeError(f"fan-out ended {final['status']}: {final['progress']}")
    result = {
        "hosts": float(total),
        "elapsed_s": _epoch(final["finished_at"]) - started,
        "cpu_ms_per_host_job": 1000 * cpu / total,
    }
    if probe_api and latencies:
        ordered = sorted(latencies)
        result["api_p50_ms"] = 1000 * statistics.median(ordered)
        result["api_p99_ms"] = 1000 * ordered[int(len(ordered) * 0.99)]
        result["api_calls"] = float(len(ordered))
    return result


def fanout_real(n: int) -> Result:
    """N separate dispatch-agent processes, each running a real `echo hi`."""
    with workdir() as work:
        daemon = Daemon(work)
        daemon.start()
        agents: list[subprocess.Popen[bytes]] = []
        try:
            for index in range(n):
                argv = agent_argv(daemon, f"real-{index:03d}", work / "agents" / str(index))
                agents.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL))  # fmt: skip
            daemon.wait_until(lambda: daemon.online() >= n, 120, f"{n} agents online")
            time.sleep(1.0)
            agents_before = sum(cpu_s(a.pid, children=True) for a in agents)
            result = _fan_out(daemon, {"labels": {"fleet": "real"}})
            time.sleep(0.5)  # the agents' last acknowledgements
            agents_cpu = sum(cpu_s(a.pid, children=True) for a in agents) - agents_before
            result["agent_cpu_ms_per_host_job"] = 1000 * agents_cpu / n  # with the `echo` itself
            result["agent_rss_mib"] = statistics.median(rss_mib(a.pid) for a in agents)
            return result
        finally:
            for agent in agents:
                agent.terminate()
            for agent in agents:
                agent.wait()
            daemon.stop()


def fanout_sim(n: int, *, probe_api: bool = True, idle_cpu_s: float = 0.0) -> Result:
    """N simulated agents (real protocol streams, no execution) in 1-4 load processes."""
    with workdir() as work:
        daemon = Daemon(work)
        daemon.start("--max-running-executions", str(max(1000, n)))
        rss_empty = rss_mib(daemon.pid)
        fleet = _start_fleet(daemon, n, "sim", "--jitter-s", str(min(10.0, n / 1000)))
        try:
            connect = daemon.wait_until(lambda: fleet.total("connected") >= n, 300,
                                        f"{n} simulated agents connected")  # fmt: skip
            daemon.wait_until(lambda: daemon.online() >= n, 120, "hosts online")
            time.sleep(2.0)
            rss_idle = rss_mib(daemon.pid)
            result: Result = {"connect_s": connect, "rss_empty_mib": rss_empty,
                              "rss_idle_mib": rss_idle,
                              "kib_per_agent": 1024 * (rss_idle - rss_empty) / n}  # fmt: skip
            if idle_cpu_s:
                before = cpu_s(daemon.pid)
                time.sleep(idle_cpu_s)
                result["idle_cpu_percent"] = 100 * (cpu_s(daemon.pid) - before) / idle_cpu_s
            # the fan-out alone (time, CPU), then a second one while the progress call is made
            # as often as it can be (its latency; the time and CPU it costs are its own)
            result.update(_fan_out(daemon, {"labels": {"fleet": "sim"}}))
            result["rss_peak_mib"] = rss_mib(daemon.pid)
            if probe_api:
                loaded = _fan_out(daemon, {"labels": {"fleet": "sim"}}, probe_api=True)
                result["elapsed_probed_s"] = loaded["elapsed_s"]
                result.update({k: v for k, v in loaded.items() if k.startswith("api_")})
            return result
        finally:
            fleet.stop()
            daemon.stop()


def skeleton(n: int) -> Result:
    """The bare grpclib fan-out with the same messages: the floor the daemon is compared to."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "bench.skeleton", "--port", str(port),
                               "--expect", str(n)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    fleet = Fleet()
    processes = _processes_for(n)
    per = (n + processes - 1) // processes
    try:
        time.sleep(0.5)
        for index in range(processes):
            count = min(per, n - index * per)
            fleet.start(sim_fleet_argv(port, "skel", index * per, count, "--jitter-s",
                                       str(min(10.0, n / 1000))))  # fmt: skip
        out, _ = server.communicate(timeout=600)
        data = json.loads(out.strip().splitlines()[-1])
        return {"hosts": float(n), "elapsed_s": data["elapsed_s"],
                "cpu_ms_per_host_job": 1000 * data["cpu_s"] / n}  # fmt: skip
    finally:
        server.kill()
        fleet.stop()


def ingest(agents: int, chunk_bytes: int, bytes_per_agent: int, rate_bps: float = 0.0) -> Result:
    """Every agent writes ``bytes_per_agent`` of stdout in chunks of ``chunk_bytes``: all at once
    (what the daemon can take; the lag is mostly the burst's own queue) or paced at ``rate_bps``
    per agent (the lag from a chunk sent to it durable, at a sustained aggregate rate)."""
    with workdir() as work:
        daemon = Daemon(work)
        daemon.start("--max-running-executions", str(max(1000, agents)))
        fleet = _start_fleet(daemon, agents, "ing", "--output-bytes", str(bytes_per_agent),
                             "--chunk-bytes", str(chunk_bytes), "--jitter-s", "1",
                             "--output-rate", str(rate_bps))  # fmt: skip
        try:
            daemon.wait_until(lambda: fleet.total("connected") >= agents, 120, "connected")
            daemon.wait_until(lambda: daemon.online() >= agents, 120, "hosts online")
            time.sleep(1.0)
            timing = _fan_out(daemon, {"labels": {"fleet": "sim"}})
            time.sleep(1.5)  # let the load processes report their last acknowledgements
            total_bytes = agents * bytes_per_agent
            frames = agents * -(-bytes_per_agent // chunk_bytes)
            lags = [s["ack_lag_p99_s"] for s in fleet.latest.values() if s.get("ack_lag_p99_s")]
            p50s = [s["ack_lag_p50_s"] for s in fleet.latest.values() if s.get("ack_lag_p50_s")]
            return {
                "mb_per_s": total_bytes / 1e6 / timing["elapsed_s"],
                "frames_per_s": frames / timing["elapsed_s"],
                "elapsed_s": timing["elapsed_s"],
                "lag_p50_s": max(p50s) if p50s else float("nan"),
                "lag_p99_s": max(lags) if lags else float("nan"),
            }
        finally:
            fleet.stop()
            daemon.stop()


def storm(n: int) -> Result:
    """N agents connected; the daemon restarts; time until all are back, and how many never."""
    with workdir() as work:
        daemon = Daemon(work)
        daemon.start()
        fleet = _start_fleet(daemon, n, "storm", "--jitter-s", str(min(10.0, n / 1000)))
        try:
            daemon.wait_until(lambda: fleet.total("connected") >= n, 300, "connected")
            daemon.wait_until(lambda: daemon.online() >= n, 120, "hosts online")
            refusals_before = fleet.total("refusals")
            daemon.stop()
            daemon.start()  # returns once the new daemon answers /healthz
            back = daemon.wait_until(lambda: daemon.online() >= n, 120, "all online again",
                                     poll_s=0.1)  # fmt: skip
            return {
                "all_back_s": back,
                "never_back": float(n - daemon.online()),
                "refusals": fleet.total("refusals") - refusals_before,
            }
        finally:
            fleet.stop()
            daemon.stop()


def machine() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    memory_kib = int(Path("/proc/meminfo").read_text().split()[1])
    import os
    import platform

    return {
        "cpu": f"{cpu} × {os.cpu_count()}",
        "memory": f"{memory_kib / 1024 / 1024:.0f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.now().astimezone().isoformat(timespec="minutes"),
    }
