#!/usr/bin/env python3
"""Two builds of oxbus, same run: publish + handler throughput (bench_inmemory.py's oxbus rows).

    python benches/bench_builds.py VENV_A VENV_B [--rounds 7] [-n 100000]

Each VENV has a wheel of oxbus installed (for instance a version-specific ``cp313`` one and the
``abi3`` one, both on the same CPython). The rounds alternate A, B, A, B, ... in fresh
processes, so drift and other load hit both alike; each process measures every oxbus case of
bench_inmemory.py once (async/sync handler, x1/x4 subscriptions, 1/4 workers, ``publish`` and
``publish_many``). Printed: the median events/s of each case per build and B's cost against A.
Used to choose between one abi3 wheel and one wheel per Python version (benches/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
import bench_inmemory as b
import oxbus._oxbus as m

async def main(n):
    out = {}
    for kind in ("async", "sync"):
        for subs in (1, 4):
            for w in (1, 4):
                out[f"{kind} x{subs} w{w} publish"] = await b.measure(
                    "publish", b.run_oxbus, kind, subs, n, 120, w, 10_000)
                out[f"{kind} x{subs} w{w} many"] = await b.measure(
                    "many", b.run_oxbus_many, kind, subs, n, 120, w, 10_000, 1000)
    if b.PROBLEMS:
        sys.exit("problems: %s" % b.PROBLEMS)
    print(json.dumps({"module": m.__file__, "eps": out}))

asyncio.run(main(int(sys.argv[2])))
"""


def run(venv: str, n: int) -> dict:
    py = os.path.join(venv, "bin", "python")
    # From a neutral directory, so `import oxbus` is the venv's wheel, not ./python.
    done = subprocess.run(
        [py, "-c", CHILD, HERE, str(n)], capture_output=True, text=True, cwd="/", check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="venv A (the reference)")
    ap.add_argument("b", help="venv B (compared against A)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-n", type=int, default=100_000, help="events per measurement")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    modules = {}
    for r in range(args.rounds):
        for which in ("a", "b") if r % 2 == 0 else ("b", "a"):
            res = run(getattr(args, which), args.n)
            modules[which] = res["module"]
            runs[which].append(res["eps"])
            print(f"round {r + 1}/{args.rounds} {which} done", file=sys.stderr, flush=True)
    print(f"A: {modules['a']}\nB: {modules['b']}")
    print(f"median of {args.rounds} runs, {args.n} events each; events/s (k)")
    print(f"{'case':28} {'A':>8} {'B':>8} {'B vs A':>8}")
    ratios = []
    for case in runs["a"][0]:
        ma = statistics.median(x[case] for x in runs["a"])
        mb = statistics.median(x[case] for x in runs["b"])
        ratios.append(mb / ma)
        print(f"{case:28} {ma / 1e3:8.0f} {mb / 1e3:8.0f} {100 * (mb / ma - 1):+7.1f}%")
    geo = statistics.geometric_mean(ratios)
    print(f"{'geometric mean':28} {'':8} {'':8} {100 * (geo - 1):+7.1f}%")
    print(f"{'worst case':28} {'':8} {'':8} {100 * (min(ratios) - 1):+7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
