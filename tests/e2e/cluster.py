"""A real devops-dispatch on loopback for end-to-end tests: the ``dispatchd`` and
``dispatch-agent`` programs as separate processes, a real database, HTTP through httpx, and a
small TCP proxy that can cut an agent's connection without touching the agent.

Every wait here is bounded; every process started is killed when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

AGENT_TOKEN = "e2e-agent-token-0123456789"
API_TOKEN = "e2e-api-token-0123456789"
TERMINAL_TASK = {"completed", "failed", "cancelled"}
REPO = Path(__file__).resolve().parents[2]

# Short enough that failure paths finish in seconds, long enough for a loaded 2-core machine.
DAEMON_TIMING = [
    "--agent-grace-s", "3", "--heartbeat-interval-s", "0.5", "--heartbeat-ttl-s", "3",
    "--kill-grace-s", "1", "--report-margin-s", "3", "--hello-timeout-s", "5",
]  # fmt: skip
AGENT_TIMING = ["--reconnect-min-s", "0.05", "--reconnect-max-s", "0.5", "--kill-grace-s", "1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


async def wait_gone(pids: list[int], timeout_s: float = 5.0) -> list[int]:
    """The pids still alive after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while any(alive(pid) for pid in pids):  # noqa: ASYNC110 (no event for another's exit)
            await trio.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


@dataclass
class Program:
    name: str
    argv: list[str]
    log: Path
    process: trio.Process | None = None

    async def start(self) -> None:
        log = self.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = await trio.lowlevel.open_process(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.process is None:
            return None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(15):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Cluster:
    """One daemon (restartable on the same database and ports) and any number of agents."""

    tmp: Path
    db_url: str
    nursery: trio.Nursery
    grpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    daemon: Program | None = None
    agents: dict[str, Program] = field(default_factory=dict)
    extra_daemon_args: list[str] = field(default_factory=list)
    # Plaintext agent port, new hosts admitted at once: what most e2e tests need. Identity tests
    # replace these (TLS files, no auto-approve).
    daemon_security_args: list[str] = field(
        default_factory=lambda: ["--plaintext", "--auto-approve"]
    )
    agent_security_args: list[str] = field(default_factory=lambda: ["--plaintext"])
    http: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.http_port}",
            headers={"Authorization": f"Bearer {API_TOKEN}"},
            timeout=30,
        )

    # ------------------------------------------------------------------ processes

    async def start_daemon(self, *extra: str) -> Program:
        argv = [
            sys.executable, "-m", "daemon", "--db", self.db_url,
            "--grpc-listen", f"127.0.0.1:{self.grpc_port}",
            "--http-listen", f"127.0.0.1:{self.http_port}",
            "--agent-token", AGENT_TOKEN, "--api-token", API_TOKEN, "--log-level", "debug",
            *DAEMON_TIMING, *self.daemon_security_args, *self.extra_daemon_args, *extra,
        ]  # fmt: skip
        self.daemon = Program("dispatchd", argv, self.tmp / "dispatchd.log")
        await self.daemon.start()
        await self.wait_healthy()
        return self.daemon

    async def wait_healthy(self, timeout_s: float = 20) -> None:
        with trio.fail_after(timeout_s):
            while True:
                assert self.daemon is not None and self.daemon.running, self.daemon_log()
                try:
                    if (await self.http.get("/healthz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(0.05)

    def agent_argv(self, host_id: str, *extra: str, port: int | None = None) -> list[str]:
        return [
            sys.executable, "-m", "agent", "--server", f"127.0.0.1:{port or self.grpc_port}",
            "--token", AGENT_TOKEN, "--host-id", host_id,
            "--state-dir", str(self.tmp / "agents" / host_id), "--log-level", "debug",
            *AGENT_TIMING, *self.agent_security_args, *extra,
        ]  # fmt: skip

    async def start_agent(self, host_id: str, *extra: str, port: int | None = None,
                          wait: bool = True) -> Program:  # fmt: skip
        agent = Program(host_id, self.agent_argv(host_id, *extra, port=port),
                        self.tmp / f"agent-{host_id}.log")  # fmt: skip
        self.agents[host_id] = agent
        await agent.start()
        if wait:
            await self.wait_online([host_id])
        return agent

    async def start_agents(self, *host_ids: str, extra: tuple[str, ...] = ()) -> None:
        for host_id in host_ids:
            await self.start_agent(host_id, *extra, wait=False)
        await self.wait_online(list(host_ids))

    async def wait_online(self, host_ids: list[str], timeout_s: float = 30) -> None:
        with trio.fail_after(timeout_s):
            while True:
                hosts = await self.get("/api/v1/hosts?status=online&limit=1000")
                online = {h["id"] for h in hosts["items"]}
                if set(host_ids) <= online:
                    return
                await trio.sleep(0.05)

    async def wait_offline(self, host_id: str, timeout_s: float = 30) -> None:
        with trio.fail_after(timeout_s):
            while (await self.get(f"/api/v1/hosts/{host_id}"))["status"] != "offline":  # noqa: ASYNC110
                await trio.sleep(0.05)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            for agent in self.agents.values():
                await agent.kill(signal.SIGKILL)
            if self.daemon is not None:
                await self.daemon.kill(signal.SIGKILL)
            await self.http.aclose()

    def daemon_log(self) -> str:
        return self.daemon.log_text()[-6000:] if self.daemon else ""

    # ------------------------------------------------------------------ HTTP

    async def get(self, path: str, **params: Any) -> Any:
        response = await self.http.get(path, params=params or None)
        assert response.status_code == 200, (path, response.status_code, response.text)
        return response.json()

    async def post(self, path: str, body: Any = None, expect: int = 201, **kw: Any) -> Any:
        response = await self.http.post(path, json=body, **kw)
        assert response.status_code == expect, (path, response.status_code, response.text)
        return response.json()

    async def run_task(self, hosts: list[str], *scripts: str, timeout_s: float = 30,
                       **settings: Any) -> str:  # fmt: skip
        body = {
            "name": settings.pop("name", "e2e"),
            "commands": [{"script": s, "timeout_s": timeout_s} for s in scripts],
            "targets": {"hosts": hosts},
            "start": True,
            **settings,
        }
        return str((await self.post("/api/v1/tasks", body))["id"])

    async def wait_task(self, task_id: str, timeout_s: float = 60) -> dict[str, Any]:
        with trio.fail_after(timeout_s):
            while True:
                task = await self.get(f"/api/v1/tasks/{task_id}")
                if task["status"] in TERMINAL_TASK:
                    return task  # type: ignore[no-any-return]
                await trio.sleep(0.05)

    async def executions(self, task_id: str, query: str = "") -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page_query = f"limit=1000{'&' + query if query else ''}"
            if cursor:
                page_query += f"&cursor={cursor}"
            page = await self.get(f"/api/v1/tasks/{task_id}/executions?{page_query}")
            items += page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return items

    async def execution(self, execution_id: str) -> dict[str, Any]:
        return await self.get(f"/api/v1/executions/{execution_id}")  # type: ignore[no-any-return]

    async def wait_executions(
        self, task_id: str, condition: Callable[[list[dict[str, Any]]], bool], timeout_s: float = 30
    ) -> list[dict[str, Any]]:
        with trio.fail_after(timeout_s):
            while True:
                items = await self.executions(task_id)
                if condition(items):
                    return items
                await trio.sleep(0.05)

    async def wait_stdout_lines(
        self, execution_id: str, lines: int, timeout_s: float = 30
    ) -> list[str]:
        with trio.fail_after(timeout_s):
            while True:
                stdout = (await self.execution(execution_id))["stdout"]
                if stdout.count("\n") >= lines:
                    return stdout.splitlines()
                await trio.sleep(0.05)

    async def metric(self, name: str) -> float:
        response = await self.http.get("/metrics")
        for line in response.text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")


@asynccontextmanager
async def open_cluster(tmp: Path, db_url: str) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(tmp, db_url, nursery)
        try:
            yield cluster
        except BaseException:
            print("---- dispatchd log (tail) ----\n" + cluster.daemon_log())
            raise
        finally:
            await cluster.aclose()
            nursery.cancel_scope.cancel()


class CuttableProxy:
    """A loopback TCP proxy whose connections can be cut at will (the agent sees a reset
    connection and reconnects through the proxy; the daemon sees the stream end)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._connections: set[trio.SocketStream] = set()
        self.accepted = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await downstream.aclose()
            return
        self._connections |= {downstream, upstream}
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, downstream, upstream, nursery.cancel_scope)
                nursery.start_soon(self._pipe, upstream, downstream, nursery.cancel_scope)
        finally:
            self._connections -= {downstream, upstream}
            for stream in (downstream, upstream):
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream,
                    scope: trio.CancelScope) -> None:  # fmt: skip
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    async def cut(self) -> int:
        """Reset every connection now; returns how many were cut."""
        cut = list(self._connections)
        for stream in cut:
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            await stream.aclose()
        return len(cut)
