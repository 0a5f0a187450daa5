#!/usr/bin/env python3
"""Interleaved A/B of this checkout's daemon against another checkout's.

    git worktree add /tmp/luanette-old <commit>
    python scripts/ab.py /tmp/luanette-old [--rounds 4] [--requests 4000]

Each round starts the other checkout's daemon, then this one's, and measures Ping and
LuaEval ``return 2+2`` at 64 in flight on each with bench.py's load generator;
alternating cancels most of a shared machine's drift. Prints the medians and the ratio.
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


def measure(source: Path | None, requests: int, clients: int) -> tuple[float, float]:
    """Ping and LuaEval req/s at 64 in flight of one daemon."""
    endpoint = bench.free_endpoint()
    with bench.Daemon(endpoint, source=source):
        # warm both before measuring: a daemon that has just started may still be
        # starting its worker processes, which takes the CPU from the first row
        bench.measure("LuaEval", endpoint, t.LuaEval(code=bench.EVAL_CODE), 2000, 64, clients)
        bench.measure("Ping", endpoint, t.Ping(), 2000, 64, clients)
        ping = bench.measure("Ping", endpoint, t.Ping(), requests, 64, clients)
        lua = bench.measure("LuaEval", endpoint, t.LuaEval(code=bench.EVAL_CODE), requests // 2, 64, clients)
    return ping.rate, lua.rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (its daemon runs from its source)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--clients", type=int, default=4, help="Python client processes (without zload)")
    parser.add_argument("--python-client", action="store_true", help="drive the rows with Python processes")
    args = parser.parse_args()
    bench.ZLOAD = None if args.python_client else bench.build_zload()
    rows: dict[str, list[tuple[float, float]]] = {"other": [], "this": []}
    for round_ in range(args.rounds):
        for label, source in (("other", args.other.resolve()), ("this", None)):
            rows[label].append(measure(source, args.requests, args.clients))
            print(f"round {round_ + 1} {label}: Ping {rows[label][-1][0]:,.0f}/s, LuaEval {rows[label][-1][1]:,.0f}/s",
                  flush=True)
    medians = {k: (statistics.median(p for p, _ in v), statistics.median(e for _, e in v)) for k, v in rows.items()}
    for label, (ping, lua) in medians.items():
        print(f"{label}: median Ping {ping:,.0f}/s, LuaEval {lua:,.0f}/s, LuaEval/Ping {lua / ping:.0%}")
    print(f"LuaEval this/other: {medians['this'][1] / medians['other'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
