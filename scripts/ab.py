#!/usr/bin/env python3
"""Interleaved A/B of this checkout's daemon against another checkout's.

    git worktree add /tmp/luanette-old <commit>
    python scripts/ab.py /tmp/luanette-old [--rounds 4] [--requests 4000]

Each round starts the other checkout's daemon, then this one's, and measures Ping and
LuaEval ``return 2+2`` at 64 in flight (``--in-flight``) on each with bench.py's load
generator; alternating cancels most of a shared machine's drift. Prints the medians of
the rates and of the p50 latencies, and the ratios.
The load comes from bench.py's compiled client (zload) unless ``--python-client``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from hooteproto import types as t  # noqa: E402


def measure(source: Path | None, requests: int, clients: int, in_flight: int = 64) -> tuple[bench.Row, bench.Row]:
    """Ping and LuaEval rows at ``in_flight`` of one daemon."""
    endpoint = bench.free_endpoint()
    with bench.Daemon(endpoint, source=source):
        # warm both before measuring: a daemon that has just started may still be
        # starting its worker processes, which takes the CPU from the first row
        bench.measure("LuaEval", endpoint, t.LuaEval(code=bench.EVAL_CODE), 2000, 64, clients)
        bench.measure("Ping", endpoint, t.Ping(), 2000, 64, clients)
        ping = bench.measure("Ping", endpoint, t.Ping(), requests, in_flight, clients)
        lua = bench.measure("LuaEval", endpoint, t.LuaEval(code=bench.EVAL_CODE), requests // 2, in_flight, clients)
    return ping, lua


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (its daemon runs from its source)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4, help="Python client processes (without zload)")
    parser.add_argument("--python-client", action="store_true", help="drive the rows with Python processes")
    parser.add_argument("--in-flight", type=int, default=64, help="requests outstanding (1: compare latency)")
    args = parser.parse_args()
    bench.ZLOAD = None if args.python_client else bench.build_zload()
    rows: dict[str, list[tuple[bench.Row, bench.Row]]] = {"other": [], "this": []}
    for round_ in range(args.rounds):
        for label, source in (("other", args.other.resolve()), ("this", None)):
            ping, lua = measure(source, args.requests, args.clients, args.in_flight)
            rows[label].append((ping, lua))
            print(f"round {round_ + 1} {label}: Ping {ping.rate:,.0f}/s p50 {ping.p50_ms:.3f} ms, "
                  f"LuaEval {lua.rate:,.0f}/s p50 {lua.p50_ms:.3f} ms", flush=True)
    fields = [(i, field) for i in (0, 1) for field in ("rate", "p50_ms")]  # Ping rate, p50, LuaEval rate, p50
    medians = {
        label: [statistics.median(getattr(row[i], field) for row in runs) for i, field in fields]
        for label, runs in rows.items()
    }
    for label, (ping, ping_p50, lua, lua_p50) in medians.items():
        print(f"{label}: median Ping {ping:,.0f}/s p50 {ping_p50:.3f} ms, LuaEval {lua:,.0f}/s p50 {lua_p50:.3f} ms, "
              f"LuaEval/Ping {lua / ping:.0%}")
    this, other = medians["this"], medians["other"]
    print(f"at {args.in_flight} in flight, this/other: LuaEval rate {this[2] / other[2]:.2f}x, "
          f"p50 {this[3] / other[3]:.2f}x; Ping rate {this[0] / other[0]:.2f}x, p50 {this[1] / other[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
