"""Simulated agents in one process: ``python -m bench.simagents --server 127.0.0.1:7443 --token T
--prefix sim --first 0 --count 2500``. Prints a JSON line of statistics every second."""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from bench.grpc_bridge import SimSettings, SimStats, run_in_asyncio, run_sim_agents


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simagents")
    parser.add_argument("--server", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--label", default="fleet=sim")
    parser.add_argument("--jitter-s", type=float, default=2.0, help="connects spread over this")
    parser.add_argument("--output-bytes", type=int, default=3, help="stdout per run")
    parser.add_argument("--chunk-bytes", type=int, default=65536, help="bytes per output event")
    parser.add_argument(
        "--heartbeat-s",
        type=float,
        default=10.0,
        help="heartbeat interval when the daemon's welcome names none",
    )
    parser.add_argument("--output-rate", type=float, default=0.0,
                        help="bytes of stdout per second per run (0: all at once)")  # fmt: skip
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    key, _, value = args.label.partition("=")
    settings = SimSettings(host=host, port=int(port), token=args.token,
                           output_bytes=args.output_bytes, chunk_bytes=args.chunk_bytes,
                           heartbeat_s=args.heartbeat_s,
                           output_rate_bps=args.output_rate)  # fmt: skip
    hosts = [f"{args.prefix}-{i:05d}" for i in range(args.first, args.first + args.count)]

    def report(stats: SimStats, connected: int) -> None:
        lags = sorted(stats.ack_lags_s)
        print(json.dumps({
            "connected": connected, "connects": stats.connects, "refusals": stats.refusals,
            "disconnects": stats.disconnects, "runs": stats.runs,
            "output_bytes": stats.output_bytes, "acked_events": stats.acked_events,
            "ack_lag_p50_s": statistics.median(lags) if lags else None,
            "ack_lag_p99_s": lags[int(len(lags) * 0.99)] if lags else None,
        }), flush=True)  # fmt: skip

    async def run() -> None:
        await run_sim_agents(hosts, {key: value}, settings, jitter_s=args.jitter_s, report=report)

    try:
        run_in_asyncio(run)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
