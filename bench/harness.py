"""Starting the real programs for a benchmark round and reading what they cost.

Plain synchronous Python: processes via ``subprocess``, HTTP via ``urllib``, costs from
``/proc/<pid>`` (resident memory; user+system CPU seconds). Every process started is stopped
when the round ends, even on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
AGENT_TOKEN = "bench-agent-token-0123456789"
API_TOKEN = "bench-api-token-0123456789"
TERMINAL = {"completed", "failed", "cancelled"}
_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int, *, children: bool = False) -> float:
    """User+system CPU seconds of ``pid``; with ``children``, also of its children it waited
    for (an agent's commands)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])
    return (own + (int(fields[13]) + int(fields[14]) if children else 0)) / _TICK


def _supports(flag: str) -> bool:
    result = subprocess.run([sys.executable, "-m", "daemon", "--help"], capture_output=True,
                            text=True, cwd=ROOT)  # fmt: skip
    return flag in result.stdout


@dataclass
class Fleet:
    """Processes of simulated agents; each prints a JSON line of statistics every second."""

    processes: list[subprocess.Popen[str]] = field(default_factory=list)
    latest: dict[int, dict[str, Any]] = field(default_factory=dict)

    def start(self, argv: list[str]) -> None:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   text=True, cwd=ROOT)  # fmt: skip
        index = len(self.processes)
        self.processes.append(process)
        threading.Thread(target=self._follow, args=(index, process), daemon=True).start()

    def _follow(self, index: int, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                self.latest[index] = json.loads(line)
            except ValueError:
                continue

    def total(self, key: str) -> float:
        return sum(stats.get(key) or 0 for stats in self.latest.values())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@dataclass
class Daemon:
    workdir: Path
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, *extra: str) -> None:
        argv = [
            sys.executable, "-m", "daemon", "--db", f"sqlite:///{self.workdir / 'bench.db'}",
            "--grpc-listen", self.grpc, "--http-listen", f"127.0.0.1:{self.http_port}",
            "--agent-token", AGENT_TOKEN, "--api-token", API_TOKEN, "--log-level", "warning",
            *extra,
        ]  # fmt: skip
        for flag in ("--plaintext", "--auto-approve"):
            if _supports(flag):
                argv.append(flag)
        log = (self.workdir / "dispatchd.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.wait_until(lambda: self.api("GET", "/healthz")["status"] == "ok", 30, "healthy")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def api(self, method: str, path: str, body: Any = None, timeout_s: float = 30) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {API_TOKEN}", "Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.load(response)

    def online(self) -> int:
        """Agents with a live stream, from /metrics: one cheap request. (Paging through
        /api/v1/hosts ten times a second cost the daemon more than the storm it measured.)"""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/metrics",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("dispatch_agents_connected "):
                    return int(float(line.split()[1]))
        raise RuntimeError("/metrics has no dispatch_agents_connected")

    def wait_until(self, condition: Any, timeout_s: float, what: str, poll_s: float = 0.2) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"dispatchd exited; see {self.workdir / 'dispatchd.log'}")
            try:
                if condition():
                    return time.monotonic() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(poll_s)
        raise TimeoutError(f"{what}: not within {timeout_s:g} s")

    def run_task(self, targets: dict[str, Any], script: str = "echo hi") -> dict[str, Any]:
        body = {"name": "bench", "commands": [{"script": script, "timeout_s": 300}],
                "targets": targets}  # fmt: skip
        return self.api("POST", "/api/v1/tasks", body)  # type: ignore[no-any-return]


def sim_fleet_argv(daemon_or_port: Daemon | int, prefix: str, first: int, count: int,
                   *extra: str) -> list[str]:  # fmt: skip
    server = (
        daemon_or_port.grpc if isinstance(daemon_or_port, Daemon) else f"127.0.0.1:{daemon_or_port}"
    )
    return [sys.executable, "-m", "bench.simagents", "--server", server, "--token", AGENT_TOKEN,
            "--prefix", prefix, "--first", str(first), "--count", str(count), *extra]  # fmt: skip


def agent_argv(daemon: Daemon, host_id: str, state: Path) -> list[str]:
    argv = [sys.executable, "-m", "agent", "--server", daemon.grpc, "--token", AGENT_TOKEN,
            "--host-id", host_id, "--label", "fleet=real", "--state-dir", str(state),
            "--log-level", "warning"]  # fmt: skip
    return argv + (["--plaintext"] if _agent_supports("--plaintext") else [])


_AGENT_FLAGS: dict[str, bool] = {}


def _agent_supports(flag: str) -> bool:
    if flag not in _AGENT_FLAGS:
        result = subprocess.run([sys.executable, "-m", "agent", "--help"], capture_output=True,
                                text=True, cwd=ROOT)  # fmt: skip
        _AGENT_FLAGS[flag] = flag in result.stdout
    return _AGENT_FLAGS[flag]


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dispatch-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
