"""What one await of a result produced on the tokio runtime costs, resolved two ways, in the
same run (issue 12 item 5; DESIGN.md "Costs that shape the design"):

- ``batched``: oxbus's batched resolver (``src/python/completion.rs``): the runtime completes a
  whole batch of loop futures with one wake-up of the loop (a byte on the socket the loop
  watches, ``src/python/wake.rs``; no GIL on the runtime's thread) — what store commits and
  Redis publish confirms use;
- ``future_into_py``: pyo3-async-runtimes' bridge (``src/python/runtime.rs``), one round trip
  per awaitable — what the one-off awaits (connect, stop) use.

Two shapes: one await at a time (a lone publisher awaiting each commit: batches of 1) and
``--width`` awaits at once (many publishers waiting together). A plain loop future resolved
with ``loop.call_soon`` is printed as the floor.

    .venv/bin/maturin develop --release
    .venv/bin/python benches/bench_awaits.py            # 20,000 awaits per run, 5 runs (~30 s)
    .venv/bin/python benches/bench_awaits.py --quick    # 2,000 awaits, 2 runs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from oxbus._oxbus import await_probe


async def one_at_a_time(kind: str, n: int) -> float:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    if kind == "call_soon":
        for _ in range(n):
            f = loop.create_future()
            loop.call_soon(f.set_result, 1)
            await f
    else:
        batched = kind == "batched"
        for _ in range(n):
            (aw,) = await_probe(batched, 1)
            await aw
    return (time.perf_counter() - t0) / n * 1e6


async def many_at_once(kind: str, n: int, width: int) -> float:
    loop = asyncio.get_running_loop()
    rounds = max(1, n // width)
    t0 = time.perf_counter()
    for _ in range(rounds):
        if kind == "call_soon":
            fs = [loop.create_future() for _ in range(width)]
            for f in fs:
                loop.call_soon(f.set_result, 1)
            await asyncio.gather(*fs)
        else:
            await asyncio.gather(*await_probe(kind == "batched", width))
    return (time.perf_counter() - t0) / (rounds * width) * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=20_000, help="awaits per run")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--width", type=int, default=100, help="awaits at once in the second shape")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.n, a.repeat = 2_000, 2
    kinds = ["call_soon", "batched", "future_into_py"]
    shapes = {"one at a time": lambda k: one_at_a_time(k, a.n),
              f"{a.width} at once": lambda k: many_at_once(k, a.n, a.width)}
    print(f"load average {os.getloadavg()[0]:.2f}; n={a.n}, {a.repeat} runs, median")
    for kind in kinds[1:]:  # warm-up: starts the runtime and its threads
        await one_at_a_time(kind, 200)
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.repeat):  # interleaved runs
        for shape, run in shapes.items():
            for kind in kinds:
                results.setdefault((shape, kind), []).append(await run(kind))
    print(f"| shape | {' | '.join(kinds)} | future_into_py / batched |")
    print("| --- |" + " --- |" * (len(kinds) + 1))
    for shape in shapes:
        med = {k: statistics.median(results[(shape, k)]) for k in kinds}
        cells = " | ".join(f"{med[k]:.1f} µs" for k in kinds)
        print(f"| {shape} | {cells} | {med['future_into_py'] / med['batched']:.1f}x |")


if __name__ == "__main__":
    asyncio.run(main())
