"""Load under failures (issue 4): 4 publishers x 250,000 events, 10% of handler calls failing
once and then succeeding (decided by the event number, so the run is deterministic).

Every event must be handled successfully exactly once, every failure retried (retried ==
failures), nothing dead-lettered, and memory bounded by ``max_queue_size`` (RSS growth read
from ``get_health_status()["memory_usage_mb"]``). Run with ``-s`` to see the counts. Only counts
are asserted: the speed of this workload is measured by ``benches/bench_load.py``.
"""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from oxbus import EventBus, RetryPolicy

PUBLISHERS = 4
PER_PUBLISHER = 250_000
TOTAL = PUBLISHERS * PER_PUBLISHER
FAIL_EVERY = 10  # event n fails its first attempt when n % 10 == 0: 10 % of the events
MAX_QUEUE = 10_000
RSS_GROWTH_LIMIT_MB = 150.0
SAMPLE_EVERY = 25_000


class Event:
    """A small event: the test allocates a million of them."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class Flaky(Exception):
    pass


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    # 100,000 expected handler failures: not logged (and not formatted) in this test.
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")


@pytest.mark.timeout(600)
async def test_a_million_events_with_ten_percent_failing_once_lose_nothing() -> None:
    bus = EventBus(
        workers=4,
        max_queue_size=MAX_QUEUE,
        retry=RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, jitter=0.0),
    )
    attempts = bytearray(TOTAL)  # calls per event
    successes = bytearray(TOTAL)  # successful calls per event

    async def handle(event: Event) -> None:
        n = event.n
        a = attempts[n]
        if a < 255:
            attempts[n] = a + 1
        if a == 0 and n % FAIL_EVERY == 0:
            raise Flaky(n)
        s = successes[n]
        if s < 255:
            successes[n] = s + 1

    bus.subscribe(Event, handle, name="load")
    await bus.start()
    gc.collect()
    baseline = bus.get_health_status()["memory_usage_mb"]
    peak = baseline
    max_queued = 0

    def sample() -> None:
        nonlocal peak, max_queued
        h = bus.get_health_status()
        peak = max(peak, h["memory_usage_mb"])
        max_queued = max(max_queued, h["queue_size"])

    async def publisher(p: int) -> None:
        base = p * PER_PUBLISHER
        publish = bus.publish
        for i in range(PER_PUBLISHER):
            await publish(Event(base + i))
            if i % SAMPLE_EVERY == 0:
                sample()

    try:
        await asyncio.gather(*(publisher(p) for p in range(PUBLISHERS)))
        sample()
        await bus.drain()
        sample()
        stats = bus.get_statistics()
        dead = len(bus.dead_letters)
    finally:
        await bus.stop(timeout=10)

    expected_failures = TOTAL // FAIL_EVERY
    handled_once = successes.count(1)
    lost = successes.count(0)
    twice = TOTAL - handled_once - lost
    calls = sum(attempts)
    growth = peak - baseline
    print(
        f"\nload: events={TOTAL:,} publishers={PUBLISHERS} handler_calls={calls:,} "
        f"failures={stats['events_failed']:,} retries={stats['retried']:,} "
        f"dead_letters={dead} losses={lost} duplicates={twice} rss_baseline_mb={baseline:.1f} "
        f"rss_peak_mb={peak:.1f} rss_growth_mb={growth:.1f} max_queued={max_queued:,}"
    )
    assert lost == 0, f"{lost} events never handled successfully"
    assert twice == 0, f"{twice} events handled successfully more than once"
    assert handled_once == TOTAL
    # Exactly the chosen 10 % failed, each exactly once, and each failure was retried.
    assert calls == TOTAL + expected_failures
    assert stats["events_failed"] == expected_failures
    assert stats["retried"] == expected_failures == stats["events_failed"]
    assert stats["dead_lettered"] == 0 and dead == 0
    assert stats["events_published"] == TOTAL == stats["events_processed"]
    assert stats["retry_queue_size"] == 0 and stats["queue_size"] == 0
    assert max_queued <= MAX_QUEUE
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB (limit {RSS_GROWTH_LIMIT_MB})"


class Keyed:
    __slots__ = ("aggregate_id", "n")

    def __init__(self, n: int, key: tuple[int, int]) -> None:
        self.n = n
        self.aggregate_id = key


@pytest.mark.timeout(600)
async def test_with_keys_the_retries_keep_per_key_order_under_load() -> None:
    # The same load with ordering keys (each publisher owns 250 keys): a retrying event holds
    # its key, so every key still sees its events succeed in publish order.
    bus = EventBus(
        workers=4,
        max_queue_size=MAX_QUEUE,
        retry=RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, jitter=0.0),
    )
    attempts = bytearray(TOTAL)
    successes = bytearray(TOTAL)
    last: dict[tuple[int, int], int] = {}
    out_of_order = 0

    async def handle(event: Keyed) -> None:
        nonlocal out_of_order
        n = event.n
        a = attempts[n]
        if a < 255:
            attempts[n] = a + 1
        if a == 0 and n % FAIL_EVERY == 0:
            raise Flaky(n)
        if last.get(event.aggregate_id, -1) > n:
            out_of_order += 1
        last[event.aggregate_id] = n
        s = successes[n]
        if s < 255:
            successes[n] = s + 1

    bus.subscribe(Keyed, handle, name="keyed-load")
    await bus.start()
    gc.collect()
    baseline = bus.get_health_status()["memory_usage_mb"]
    peak = baseline

    async def publisher(p: int) -> None:
        nonlocal peak
        base = p * PER_PUBLISHER
        publish = bus.publish
        for i in range(PER_PUBLISHER):
            await publish(Keyed(base + i, (p, i % 250)))
            if i % SAMPLE_EVERY == 0:
                peak = max(peak, bus.get_health_status()["memory_usage_mb"])

    try:
        await asyncio.gather(*(publisher(p) for p in range(PUBLISHERS)))
        await bus.drain()
        peak = max(peak, bus.get_health_status()["memory_usage_mb"])
        stats = bus.get_statistics()
        dead = len(bus.dead_letters)
    finally:
        await bus.stop(timeout=10)

    lost = successes.count(0)
    twice = TOTAL - successes.count(1) - lost
    print(
        f"\nkeyed load: events={TOTAL:,} keys={PUBLISHERS * 250} failures={stats['events_failed']:,} "
        f"retries={stats['retried']:,} dead_letters={dead} losses={lost} duplicates={twice} "
        f"out_of_order={out_of_order} rss_growth_mb={peak - baseline:.1f}"
    )
    assert lost == 0 and twice == 0
    assert out_of_order == 0
    assert stats["events_failed"] == stats["retried"] == TOTAL // FAIL_EVERY
    assert stats["dead_lettered"] == 0 and dead == 0
    assert peak - baseline < RSS_GROWTH_LIMIT_MB
