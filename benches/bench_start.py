#!/usr/bin/env python3
"""Start-up of a durable bus over a large log with nothing to deliver (issue 11, item 5).

    .venv/bin/python benches/bench_start.py              # 400,000 events
    .venv/bin/python benches/bench_start.py --events 50000

A log is written by a durable bus whose three subscriptions each take one of three event types
from interleaved traffic (A, B, C, A, ...), drained and stopped. Then, each in a fresh process
(so memory is the start's own): the time of ``await bus.start()`` with the same three
subscriptions (nothing left to deliver), the process's peak RSS, the progress rows, and, for
reference, the start of a bus with no subscriptions. Before progress moved past events a
subscription does not take, progress kept a row per delivery and a 400k-event log took 5.5 s and
320 MB to start (0.00 s and 25 MB without subscriptions).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WRITE = textwrap.dedent(
    """
    import asyncio, sys
    from oxbus import EventBus

    async def main(db, n):
        bus = EventBus(store=db)
        for kind in "ABC":
            bus.subscribe(kind, lambda e: None, name=f"takes-{kind}")
        async with bus:
            for start in range(0, n, 5000):
                await bus.publish_many(
                    [{"event_type": "ABC"[i % 3], "i": i} for i in range(start, min(n, start + 5000))]
                )
            await bus.drain()

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)

START = textwrap.dedent(
    """
    import asyncio, resource, sys, time
    from oxbus import EventBus
    from oxbus.flow import LogReader

    async def main(db, subscribed):
        bus = EventBus(store=db)
        if subscribed:
            for kind in "ABC":
                bus.subscribe(kind, lambda e: None, name=f"takes-{kind}")
        t0 = time.perf_counter()
        await bus.start()
        started = time.perf_counter() - t0
        await bus.stop()
        return started

    started = asyncio.run(main(sys.argv[1], sys.argv[2] == "1"))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with LogReader(sys.argv[1]) as log:
        ((rows,),) = log.query("SELECT COUNT(*) FROM progress_ranges")
    print(f"{started:.4f} {rss:.1f} {rows}")
    """
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=400_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = str(Path(tmp) / "start.db")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", WRITE, db, str(args.events)], check=True)
        print(f"wrote {args.events:,} interleaved events in {time.perf_counter() - t0:.1f} s")
        for label, subscribed in (("3 subscriptions", "1"), ("no subscriptions", "0")):
            out = subprocess.run(
                [sys.executable, "-c", START, db, subscribed], check=True, capture_output=True, text=True
            ).stdout.split()
            started, rss, rows = float(out[0]), float(out[1]), int(out[2])
            print(f"start, {label:17}: {started * 1000:8.1f} ms, peak RSS {rss:6.1f} MB, progress rows {rows}")


if __name__ == "__main__":
    main()
