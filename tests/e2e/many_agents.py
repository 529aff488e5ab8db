"""Many agent identities in one process, each a real protocol stream with its own journal and
real command execution: ``python -m tests.e2e.many_agents --server HOST:PORT --token T
--prefix sim --count 200 --state-root DIR``. Runs until SIGTERM/SIGINT. The reconnect-storm
fault test adds its knobs: ``--reconnect-min-s 0.1 --reconnect-max-s 5 --connect-timeout-s 10
--no-journal-fsync [--cgroup-root DIR]`` (it measures reconnects, not disks)."""

from __future__ import annotations

import argparse
import logging
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from agent.config import AgentConfig
from agent.connection import open_agent
from common import grpc_bridge
from common.logs import configure_logging


async def serve(args: argparse.Namespace) -> None:
    extra: dict[str, Any] = {}
    if args.connect_timeout_s is not None:
        extra["connect_timeout_s"] = args.connect_timeout_s
    if args.cgroup_root is not None:
        extra.update(cgroups=True, cgroup_root=Path(args.cgroup_root))
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with AsyncExitStack() as stack:
            for index in range(args.count):
                host_id = f"{args.prefix}-{index:04d}"
                config = AgentConfig(
                    server=args.server,
                    token=args.token,
                    host_id=host_id,
                    labels={"fleet": args.prefix},
                    state_dir=Path(args.state_root) / host_id,
                    reconnect_min_s=args.reconnect_min_s,
                    reconnect_max_s=args.reconnect_max_s,
                    plaintext=True,
                    journal_fsync=args.journal_fsync,
                    **extra,
                )
                await stack.enter_async_context(open_agent(config))
            logging.getLogger(__name__).warning("%d agents running", args.count)
            async for _ in signals:
                break


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--server", "--token", "--prefix", "--state-root"):
        parser.add_argument(name, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--reconnect-min-s", type=float, default=0.05)
    parser.add_argument("--reconnect-max-s", type=float, default=2.0)
    parser.add_argument("--connect-timeout-s", type=float)
    parser.add_argument("--no-journal-fsync", dest="journal_fsync", action="store_false")
    parser.add_argument("--cgroup-root")
    configure_logging("warning")
    grpc_bridge.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
