"""The bare transport skeleton: ``python -m bench.skeleton --port P --expect N``. Waits for N
simulated agents, fans one run out to each, waits for every result, prints a JSON line and exits."""

from __future__ import annotations

import argparse
import dataclasses
import json

from bench.grpc_bridge import run_in_asyncio, serve_skeleton


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.skeleton")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()

    async def run() -> None:
        result = await serve_skeleton(args.port, args.expect)
        print(json.dumps(dataclasses.asdict(result)), flush=True)

    run_in_asyncio(run)


if __name__ == "__main__":
    main()
