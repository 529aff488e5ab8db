"""Many agent identities in one process, each a real protocol stream with its own journal and
real command execution: ``python -m tests.e2e.many_agents --server HOST:PORT --token T
--prefix sim --count 200 --state-root DIR``. Runs until SIGTERM/SIGINT."""

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
                config = AgentConfig(
                    server=args.server,
                    token=args.token,
                    host_id=f"{args.prefix}-{index:04d}",
                    labels={"fleet": args.prefix},
                    state_dir=Path(args.state_root) / f"{args.prefix}-{index:04d}",
                    reconnect_min_s=0.05,
                    reconnect_max_s=2.0,
                    plaintext=True,
                )
                await stack.enter_async_context(open_agent(config))
            logging.getLogger(__name__).info("%d agents running", args.count)
            async for _ in signals:
                break


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--server", "--token", "--prefix", "--state-root"):
        parser.add_argument(name, required=True)
    parser.add_argument("--count", type=int, required=True)
    configure_logging("warning")
    grpc_bridge.run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
