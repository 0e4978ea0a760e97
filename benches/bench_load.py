#!/usr/bin/env python3
"""Load with failures: the speed side of tests/test_load.py (which asserts only counts).

    .venv/bin/python benches/bench_load.py            # 4 publishers x 250,000 events, 3 runs
    .venv/bin/python benches/bench_load.py --quick    # 4 x 25,000 events, 1 run (seconds)

The workload is the test's: 4 publisher tasks ``await bus.publish(e)`` into one
``EventBus(workers=4, max_queue_size=10_000)``; with ``--fail 10`` (the default) every tenth
event fails its first attempt and is retried at once (``RetryPolicy(max_attempts=3,
base_delay=0)``). Three variants run interleaved, run by run:

  clean   no failures, no keys            the same bus without the failure path
  fail    10% failing once, no keys       tests/test_load.py's first test
  keyed   10% failing once, 1,000 keys    tests/test_load.py's second test (a retry holds its key)

Throughput is end to end: from before the first publish until ``drain()`` returns;
events/s = events / that time. The table shows the median of the runs and the RSS growth
(``get_health_status()["memory_usage_mb"]``, sampled every 25,000 publishes) of the worst run.
``fail/clean`` is the price of the failures and retries, measured in the same run. Exit status
1 only if a run lost or repeated an event (the test's assertions, kept here as a check).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import statistics
import sys
import time

from oxbus import EventBus, RetryPolicy

pc = time.perf_counter
SAMPLE_EVERY = 25_000


class LoadEvent:
    __slots__ = ("aggregate_id", "n")

    def __init__(self, n: int, key: tuple[int, int] | None) -> None:
        self.n = n
        self.aggregate_id = key


class Flaky(Exception):
    pass


async def one_run(variant: str, publishers: int, per: int, fail_every: int) -> dict[str, float]:
    total = publishers * per
    bus = EventBus(
        workers=4,
        max_queue_size=10_000,
        retry=RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, jitter=0.0),
    )
    attempts = bytearray(total)
    successes = bytearray(total)
    failing = variant != "clean"

    async def handle(event: LoadEvent) -> None:
        n = event.n
        a = attempts[n]
        if a < 255:
            attempts[n] = a + 1
        if failing and a == 0 and n % fail_every == 0:
            raise Flaky(n)
        s = successes[n]
        if s < 255:
            successes[n] = s + 1

    bus.subscribe(LoadEvent, handle, name=f"load-{variant}")
    await bus.start()
    gc.collect()
    baseline = peak = bus.get_health_status()["memory_usage_mb"]

    async def publisher(p: int) -> None:
        nonlocal peak
        base = p * per
        publish = bus.publish
        for i in range(per):
            key = (p, i % 250) if variant == "keyed" else None
            await publish(LoadEvent(base + i, key))
            if i % SAMPLE_EVERY == 0:
                peak = max(peak, bus.get_health_status()["memory_usage_mb"])

    t0 = pc()
    try:
        await asyncio.gather(*(publisher(p) for p in range(publishers)))
        await bus.drain()
        seconds = pc() - t0
        peak = max(peak, bus.get_health_status()["memory_usage_mb"])
    finally:
        await bus.stop(timeout=10)
    wrong = total - successes.count(1)
    return {"seconds": seconds, "rate": total / seconds, "rss": peak - baseline, "wrong": wrong}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("-n", type=int, default=250_000, help="events per publisher")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fail", type=int, default=10, help="every FAIL-th event fails once")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.repeat = 25_000, 1
    logging.getLogger("oxbus").setLevel(logging.CRITICAL + 1)  # the expected failures
    total = args.publishers * args.n
    print(
        f"load average {os.getloadavg()[0]:.2f}; {args.publishers} publishers x {args.n:,} "
        f"events, every {args.fail}th failing once, {args.repeat} run(s), python {sys.version.split()[0]}"
    )
    variants = ("clean", "fail", "keyed")
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.repeat):
        for v in variants:
            runs[v].append(asyncio.run(one_run(v, args.publishers, args.n, args.fail)))
    print("\n| variant | events | median s | events/s | RSS growth MB (max) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rate = {}
    for v in variants:
        rate[v] = statistics.median(r["rate"] for r in runs[v])
        secs = statistics.median(r["seconds"] for r in runs[v])
        rss = max(r["rss"] for r in runs[v])
        print(f"| {v} | {total:,} | {secs:.2f} | {rate[v]:,.0f} | {rss:.1f} |")
    print(f"\nfail/clean {rate['fail'] / rate['clean']:.2f}, keyed/clean {rate['keyed'] / rate['clean']:.2f}")
    wrong = {v: sum(r["wrong"] for r in runs[v]) for v in variants}
    if any(wrong.values()):
        print(f"PROBLEM: events not handled successfully exactly once: {wrong}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
