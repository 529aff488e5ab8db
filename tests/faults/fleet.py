"""Many agent identities in one process for the reconnect-storm test, like
``tests.e2e.many_agents`` but with the knobs a storm needs: ``python -m tests.faults.fleet
--server HOST:PORT --token T --prefix f0 --count 500 --state-root DIR [--cgroup-root DIR]``.
Runs until SIGTERM/SIGINT. Journals skip fsync (this measures reconnects, not disks)."""

from __future__ import annotations

import argparse
import logging
import signal
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from agent.config import AgentConfig
from agent.connection import open_agent
from common import grpc_bridge
from common.logs import configure_logging


async def serve(args: argparse.Namespace) -> None:
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
                    reconnect_min_s=0.1,
                    reconnect_max_s=5.0,
                    connect_timeout_s=args.connect_timeout_s,
                    plaintext=True,
                    journal_fsync=False,
                    cgroups=args.cgroup_root is not None,
                    cgroup_root=Path(args.cgroup_root) if args.cgroup_root else None,
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
    parser.add_argument("--cgroup-root")
    parser.add_argument("--connect-timeout-s", type=float, default=10.0)
    configure_logging("warning")
    grpc_bridge.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
