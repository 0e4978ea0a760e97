"""A 1,000,000-event run with ``max_queue_size=1000`` keeps memory bounded (DESIGN.md,
"memory: bounded by max_queue_size").

The run happens in a fresh interpreter so its peak RSS (``ru_maxrss``) belongs to it alone.
Only memory and counts are asserted; the time it takes is no part of the promise.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import asyncio, json, resource, sys
import oxbus

class Tick(oxbus.DomainEvent):
    def __init__(self, n):
        super().__init__()
        self.n = n
        self.payload = "x" * 64

    @property
    def aggregate_id(self):
        return self.n % 64

N = 1_000_000

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

async def main():
    bus = oxbus.EventBus(workers=4, max_queue_size=1000)
    handled = 0
    peak_health = 0.0
    peak_queue = 0

    async def handler(event):
        nonlocal handled, peak_health, peak_queue
        handled += 1
        if handled % 50_000 == 0:
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            peak_health = max(peak_health, bus.get_health_status()["memory_usage_mb"])
            peak_queue = max(peak_queue, bus.get_statistics()["queue_size"])

    bus.subscribe(Tick, handler)
    async with bus:
        # Warm up (routes, lanes, allocator) before taking the baseline.
        for i in range(5_000):
            await bus.publish(Tick(i))
        await bus.drain()
        baseline = rss_mb()
        baseline_health = bus.get_health_status()["memory_usage_mb"]
        maxrss_at_baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_sampled = baseline
        for i in range(N):
            await bus.publish(Tick(i))
            if i % 10_000 == 9_999:
                peak_sampled = max(peak_sampled, rss_mb())
                peak_queue = max(peak_queue, bus.get_statistics()["queue_size"])
        await bus.drain()
        stats = bus.get_statistics()
    # One event's own size, to show what 1M queued events would need.
    e = Tick(1)
    one = sys.getsizeof(e) + sys.getsizeof(e.__dict__) + sys.getsizeof(e.payload)
    print(json.dumps({
        "baseline_mb": baseline,
        "baseline_health_mb": baseline_health,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "maxrss_at_baseline_mb": maxrss_at_baseline,
        "peak_sampled_mb": peak_sampled,
        "peak_health_mb": peak_health,
        "peak_queue": peak_queue,
        "handled": handled,
        "published": stats["events_published"],
        "processed": stats["events_processed"],
        "one_event_bytes": one,
    }))

asyncio.run(main())
"""


@pytest.mark.timeout(900)  # a hang guard for a slow (debug) build, not a time budget
def test_a_million_events_with_max_queue_size_1000_keep_memory_bounded() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["handled"] == 1_005_000
    assert r["published"] == r["processed"] == 1_005_000
    assert r["peak_queue"] <= 1000
    # 1M queued events would need at least this much for the event objects alone.
    unbounded_mb = 1_000_000 * r["one_event_bytes"] / 2**20
    assert unbounded_mb > 200
    # RSS is sampled every 10,000 publishes. ru_maxrss only tells of a *new* peak: on Linux it
    # carries over exec from the forked parent (pytest), so it starts above the child's own RSS.
    growth = max(r["peak_sampled_mb"], r["peak_health_mb"]) - r["baseline_mb"]
    assert growth < 40, r
    assert r["peak_mb"] - max(r["maxrss_at_baseline_mb"], r["baseline_mb"]) < 40, r
