"""What the fault-injection tests add to ``tests.e2e.cluster`` (reused, not changed): agents in a
per-test cgroup, helper processes with their own environment, a loopback proxy that can
black-hole or throttle traffic while keeping the connections open, /proc measurements, a SQLite
locker, tmpfs mounts, libfaketime, and the figures each test reports.

Every process started here is registered with the cluster (``cluster.agents``), which kills it
when the test ends, pass or fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from agent import cgroups as cg
from tests.agent.agent_testing import remove_cgroup_tree
from tests.e2e.cluster import REPO, Cluster, Program, alive, free_port

# The thread-safe build: dispatchd and the agent read the clock from several threads (trio's
# worker threads for the database and the journal), and the plain build's unlocked re-read of
# the timestamp file let one of them see the real time now and then.
FAKETIME_LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")

# ------------------------------------------------------------------ figures


@dataclass
class Figure:
    test: str
    name: str
    value: float
    unit: str


FIGURES: list[Figure] = []


def record_figure(request: pytest.FixtureRequest, name: str, value: float, unit: str) -> None:
    """A measured figure: printed in the run's summary (and appended as a JSON line to
    ``$DISPATCH_FAULT_FIGURES`` when set). Figures are reported, never asserted."""
    figure = Figure(request.node.name, name, round(value, 3), unit)
    FIGURES.append(figure)
    target = os.environ.get("DISPATCH_FAULT_FIGURES")
    if target:
        with open(target, "a") as out:
            out.write(json.dumps(figure.__dict__) + "\n")


# ------------------------------------------------------------------ processes


@dataclass
class EnvProgram(Program):
    """A ``Program`` started with extra environment variables (and without the cluster's)."""

    env: dict[str, str] = field(default_factory=dict)

    async def start(self) -> None:
        log = self.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.process = await trio.lowlevel.open_process(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
        log.close()


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Extra environment for the programs the cluster starts inside the block (Program.start
    copies ``os.environ`` when it spawns)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class FaultCluster(Cluster):
    """A ``Cluster`` whose agents put their command cgroups under a per-test root (or use
    process groups only where cgroups are unavailable)."""

    cgroup_root: Path | None = None

    def agent_argv(self, host_id: str, *extra: str, port: int | None = None) -> list[str]:
        where = ["--cgroup-root", str(self.cgroup_root)] if self.cgroup_root else ["--no-cgroups"]
        return super().agent_argv(host_id, *where, *extra, port=port)

    async def start_program(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None
    ) -> Program:
        program = EnvProgram(name, argv, self.tmp / f"{name}.log", env=env or {})
        self.agents[name] = program  # killed with the agents when the test ends
        await program.start()
        return program

    def agent_log(self, host_id: str) -> str:
        return self.agents[host_id].log_text()


def usable_cgroup_parent() -> tuple[Path | None, str]:
    """Where a test may make cgroups, or None and why not."""
    try:
        parent = cg.default_parent(
            Path("/proc/mounts").read_text(), Path("/proc/self/cgroup").read_text()
        )
    except cg.CgroupsUnavailable as exc:
        return None, str(exc)
    reason = cg._probe(parent)
    return (parent, "") if reason is None else (None, reason)


@asynccontextmanager
async def open_fault_cluster(
    tmp: Path, db_url: str, *, cgroups: bool = True
) -> AsyncIterator[FaultCluster]:
    """``tests.e2e.cluster.open_cluster`` with a ``FaultCluster`` and a per-test cgroup root."""
    parent, _ = usable_cgroup_parent() if cgroups else (None, "")
    root = parent / f"dispatch-faults.{uuid.uuid4().hex[:12]}" if parent else None
    if root is not None:
        root.mkdir()
    try:
        async with trio.open_nursery() as nursery:
            cluster = FaultCluster(tmp, db_url, nursery, cgroup_root=root)
            try:
                yield cluster
            except BaseException:
                print("---- dispatchd log (tail) ----\n" + cluster.daemon_log())
                for name, agent in cluster.agents.items():
                    print(f"---- {name} log (tail) ----\n" + agent.log_text()[-3000:])
                raise
            finally:
                await cluster.aclose()
                nursery.cancel_scope.cancel()
    finally:
        if root is not None:
            remove_cgroup_tree(root)


# ------------------------------------------------------------------ the network


class FaultyProxy:
    """A loopback TCP proxy between agents and the daemon that can, at any moment:

    - ``blackhole()``: stop moving bytes in both directions on every connection, new ones
      included, while every connection stays open (a partition in which TCP sees nothing wrong);
      ``heal()`` moves what was held back, as TCP would after the partition;
      ``blackhole("down")`` holds back only what the daemon sends;
    - throttle each direction to ``up_bytes_per_s`` (agent to daemon) and ``down_bytes_per_s``
      (daemon to agent): a slow agent that sends, or reads, slowly.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        up_bytes_per_s: float | None = None,
        down_bytes_per_s: float | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.rates = {"up": up_bytes_per_s, "down": down_bytes_per_s}
        self.accepted = 0
        self.moved = {"up": 0, "down": 0}
        self._flowing = {"up": trio.Event(), "down": trio.Event()}
        for event in self._flowing.values():
            event.set()

    def blackhole(self, direction: str | None = None) -> None:
        for name in [direction] if direction else ["up", "down"]:
            if self._flowing[name].is_set():
                self._flowing[name] = trio.Event()

    def heal(self) -> None:
        for event in self._flowing.values():
            event.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1", backlog=4096)
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.accepted += 1
        await self._flowing["up"].wait()  # a partition holds new connections too
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        except OSError:
            await downstream.aclose()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, downstream, upstream, "up", nursery.cancel_scope)
                nursery.start_soon(self._pipe, upstream, downstream, "down", nursery.cancel_scope)
        finally:
            for stream in (downstream, upstream):
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, direction: str,
                    scope: trio.CancelScope) -> None:  # fmt: skip
        rate = self.rates[direction]
        chunk = 65536 if rate is None else max(1, int(rate / 20))
        try:
            while True:
                await self._flowing[direction].wait()
                data = await source.receive_some(chunk)
                if not data:
                    break
                await self._flowing[direction].wait()  # held back until the heal
                await sink.send_all(data)
                self.moved[direction] += len(data)
                if rate is not None:
                    await trio.sleep(len(data) / rate)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


# ------------------------------------------------------------------ /proc, files, mounts


def proc_status_kib(pid: int, field_name: str) -> int:
    """A ``VmRSS``/``VmHWM``-style field of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for pid {pid}")


class RssSampler:
    """Samples a process's RSS while it runs: ``peak_kib`` and ``samples``."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[int] = []

    @property
    def peak_kib(self) -> int:
        return max(self.samples)

    async def run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.samples.append(proc_status_kib(self.pid, "VmRSS"))
            await trio.sleep(self.interval_s)


def sqlite_integrity(path: Path) -> str:
    connection = sqlite3.connect(path)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def sqlite_path(db_url: str) -> Path:
    assert db_url.startswith("sqlite:///"), db_url
    return Path(db_url[len("sqlite:///") :])


LOCKER = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
connection.execute("COMMIT")
print("released", flush=True)
"""


def locker_argv(db: Path, hold_s: float) -> list[str]:
    """A process that holds ``BEGIN EXCLUSIVE`` on the SQLite file for ``hold_s`` seconds."""
    return [sys.executable, "-c", LOCKER, str(db), str(hold_s)]


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tiny tmpfs mounted at ``path`` for the block; skips the test where mounting is not
    permitted (not root, no CAP_SYS_ADMIN, a restricted container)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or result.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, *, leave_bytes: int) -> Path:
    """Fill the file system holding ``path`` until about ``leave_bytes`` are free."""
    filler = path / "filler"
    stats = os.statvfs(path)
    free = stats.f_bavail * stats.f_frsize
    with open(filler, "wb") as out:
        remaining = max(0, free - leave_bytes)
        block = b"\0" * (1 << 20)
        while remaining > 0:
            try:
                out.write(block[: min(len(block), remaining)])
                out.flush()
            except OSError:
                break
            remaining -= min(len(block), remaining)
    return filler


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def faketime_env(spec_file: Path, spec: str) -> dict[str, str]:
    """libfaketime for a program: only its wall clock follows ``spec_file`` (re-read at every
    call, so writing the file makes the clock jump, as settimeofday would); monotonic clocks are
    left alone. Skips the test when libfaketime is not installed."""
    if not FAKETIME_LIB.exists():
        pytest.skip(f"libfaketime is not installed ({FAKETIME_LIB}); apt-get install faketime")
    spec_file.write_text(spec + "\n")
    return {
        "LD_PRELOAD": str(FAKETIME_LIB),
        "FAKETIME_TIMESTAMP_FILE": str(spec_file),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def pids_alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if alive(pid)]


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def by_host(items: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(e["host_id"], e["command_index"]): e for e in items}
