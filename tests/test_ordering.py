"""Per-key ordering with many workers: same-key events are handled in publish order, one at a
time; different keys overlap (seed 000, problem #2, solved without giving up workers)."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from typing import Any

import pytest

from oxbus import DomainEvent, EventBusFactory, RetryPolicy
from oxbus.testing import ManualClock


class LedgerEntry(DomainEvent):
    def __init__(self, account: str, seq: int, spins: int) -> None:
        super().__init__()
        self.account = account
        self.seq = seq
        self.spins = spins

    @property
    def aggregate_id(self) -> str:
        return self.account


class Tracker:
    """Records handling order per key, concurrency per key, and overall concurrency."""

    def __init__(self) -> None:
        self.order: dict[Any, list[int]] = defaultdict(list)
        self.active: dict[Any, int] = defaultdict(int)
        self.max_active_per_key = 0
        self.running = 0
        self.max_running = 0
        self.keys_seen_running_together: set[frozenset[Any]] = set()
        self.running_keys: dict[Any, int] = defaultdict(int)

    async def handle(self, key: Any, seq: int, spins: int) -> None:
        self.active[key] += 1
        self.max_active_per_key = max(self.max_active_per_key, self.active[key])
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.running_keys[key] += 1
        live = frozenset(k for k, v in self.running_keys.items() if v)
        if len(live) > 1:
            self.keys_seen_running_together.add(live)
        try:
            for _ in range(spins):
                await asyncio.sleep(0)  # sleep-ok: a real suspension: other events may run now
            self.order[key].append(seq)
        finally:
            self.active[key] -= 1
            self.running -= 1
            self.running_keys[key] -= 1


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_same_key_events_are_handled_in_publish_order_one_at_a_time(
    make_bus: Any, seed: int
) -> None:
    rng = random.Random(seed)
    bus = await make_bus(workers=4)
    tracker = Tracker()

    async def handler(event: LedgerEntry) -> None:
        await tracker.handle(event.account, event.seq, event.spins)

    bus.subscribe(LedgerEntry, handler)
    accounts = [f"acct-{i}" for i in range(8)]
    expected: dict[str, list[int]] = defaultdict(list)
    for seq in range(800):
        account = rng.choice(accounts)
        expected[account].append(seq)
        await bus.publish(LedgerEntry(account, seq, rng.randint(1, 6)))
    await bus.drain()
    assert dict(tracker.order) == dict(expected)
    assert tracker.max_active_per_key == 1


async def test_different_keys_are_handled_concurrently_across_workers(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    tracker = Tracker()

    async def handler(event: LedgerEntry) -> None:
        await tracker.handle(event.account, event.seq, event.spins)

    bus.subscribe(LedgerEntry, handler)
    for seq in range(40):
        await bus.publish(LedgerEntry(f"acct-{seq % 4}", seq, 5))
    await bus.drain()
    assert tracker.max_running == 4
    assert tracker.max_active_per_key == 1


async def test_concurrency_never_exceeds_the_worker_count(make_bus: Any) -> None:
    bus = await make_bus(workers=3)
    tracker = Tracker()

    async def handler(event: LedgerEntry) -> None:
        await tracker.handle(event.account, event.seq, event.spins)

    bus.subscribe(LedgerEntry, handler)
    for seq in range(60):
        await bus.publish(LedgerEntry(f"acct-{seq}", seq, 3))  # all keys distinct
    await bus.drain()
    assert tracker.max_running == 3


async def test_publish_key_overrides_aggregate_id_for_ordering(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    tracker = Tracker()
    rng = random.Random(7)

    async def handler(event: dict[str, Any]) -> None:
        await tracker.handle("forced", event["seq"], event["spins"])

    bus.subscribe("ledger.entry", handler)
    for seq in range(200):
        # Different aggregate ids, one explicit key: one lane.
        event = {"event_type": "ledger.entry", "aggregate_id": f"a-{seq}", "seq": seq,
                 "spins": rng.randint(1, 5)}
        await bus.publish(event, key="one-lane")
    await bus.drain()
    assert tracker.order["forced"] == list(range(200))
    assert tracker.max_active_per_key == 1


async def test_dict_aggregate_id_orders_dict_events(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    tracker = Tracker()
    rng = random.Random(11)

    async def handler(event: dict[str, Any]) -> None:
        await tracker.handle(event["aggregate_id"], event["seq"], event["spins"])

    bus.subscribe("ledger.entry", handler)
    expected: dict[str, list[int]] = defaultdict(list)
    for seq in range(300):
        agg = f"a-{rng.randrange(5)}"
        expected[agg].append(seq)
        await bus.publish(
            {"event_type": "ledger.entry", "aggregate_id": agg, "seq": seq,
             "spins": rng.randint(1, 4)}
        )
    await bus.drain()
    assert dict(tracker.order) == dict(expected)
    assert tracker.max_active_per_key == 1


async def test_same_key_order_holds_across_several_subscriptions(make_bus: Any) -> None:
    # The whole event (every subscription) completes before the next same-key event starts.
    bus = await make_bus(workers=4)
    log: list[tuple[str, int, str]] = []
    rng = random.Random(5)

    def make(tag: str) -> Any:
        async def h(event: LedgerEntry) -> None:
            for _ in range(rng.randint(1, 4)):
                await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            log.append((event.account, event.seq, tag))

        return h

    bus.subscribe(LedgerEntry, make("a"), priority=1)
    bus.subscribe(LedgerEntry, make("b"), priority=2)
    for seq in range(120):
        await bus.publish(LedgerEntry(f"acct-{seq % 3}", seq, 0))
    await bus.drain()
    for acct in ("acct-0", "acct-1", "acct-2"):
        mine = [(s, t) for a, s, t in log if a == acct]
        seqs = [s for s in range(120) if f"acct-{s % 3}" == acct]
        assert mine == [(s, t) for s in seqs for t in ("a", "b")]


async def test_seed_problem_2_event1_event2_event3_keep_order_with_many_workers() -> None:
    # Seed 000, problem #2: with worker_count > 1 the old bus handled Event3 -> Event1 -> Event2.
    for run in range(20):
        bus = EventBusFactory.create_in_memory_event_bus(worker_count=4)
        order: list[int] = []
        rng = random.Random(run)

        async def handler(event: LedgerEntry) -> None:
            for _ in range(rng.randint(0, 5)):
                await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            order.append(event.seq)

        bus.subscribe(LedgerEntry, handler)
        await bus.start()
        try:
            await bus.publish(LedgerEntry("order-1", 1, 0))
            await bus.publish(LedgerEntry("order-1", 2, 0))
            await bus.publish(LedgerEntry("order-1", 3, 0))
            await bus.drain()
        finally:
            await bus.stop()
        assert order == [1, 2, 3], f"run {run}"


async def test_a_retried_event_still_blocks_later_events_of_its_key(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")  # ten expected failure tracebacks
    bus = await make_bus(workers=4, retry=RetryPolicy(base_delay=0.002, jitter=0.0))
    order: list[int] = []
    failed_once: set[int] = set()

    async def handler(event: LedgerEntry) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        if event.seq % 3 == 0 and event.seq not in failed_once:
            failed_once.add(event.seq)
            raise ValueError(f"first try of {event.seq}")
        order.append(event.seq)

    bus.subscribe(LedgerEntry, handler, retry_count=2)
    for seq in range(30):
        await bus.publish(LedgerEntry("acct-1", seq, 0))
    await bus.drain()
    assert order == list(range(30))


@pytest.mark.parametrize("seed", [7, 8])
async def test_many_keys_keep_order_and_one_event_at_a_time_through_backoff_on_4_workers(
    make_bus: Any, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    # 60 keys x 15 events on 4 workers; some events fail once or twice and wait out an
    # exponential backoff (1 s, then 2 s, jittered) on a manual clock. While an event
    # of key K waits to be retried, no later event of K may start: every attempt at K's event
    # s must find K's events 0..s-1 finished and nothing else of K running.
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")  # the failures are expected
    rng = random.Random(seed)
    clock = ManualClock()
    bus = await make_bus(
        workers=4,
        clock=clock,
        retry=RetryPolicy(max_attempts=3, base_delay=1.0, multiplier=2.0, jitter=0.1),
    )
    keys = [f"acct-{k}" for k in range(60)]
    per_key = 15
    # Sparse enough that some of the 4 workers are free while others hold an event in backoff
    # (a backoff keeps its worker): a key released during its backoff would be taken at once.
    fails = {
        (k, s): rng.choices([0, 1, 2], weights=[85, 10, 5])[0]
        for k in keys
        for s in range(per_key)
    }
    attempts: dict[tuple[str, int], int] = defaultdict(int)
    done: dict[str, list[int]] = defaultdict(list)
    running: dict[str, int] = defaultdict(int)
    wrong: list[str] = []
    busy = max_busy = 0
    backoff_seen: set[float] = set()

    async def handler(event: LedgerEntry) -> None:
        nonlocal busy, max_busy
        k, s = event.account, event.seq
        if running[k]:
            wrong.append(f"{k}/{s} started while {running[k]} other event(s) of {k} ran")
        if done[k] != list(range(s)):
            wrong.append(f"{k}/{s} started after {done[k][-3:]} (attempt {attempts[(k, s)] + 1})")
        running[k] += 1
        busy += 1
        max_busy = max(max_busy, busy)
        backoff_seen.add(clock.time())
        try:
            for _ in range(event.spins):
                await asyncio.sleep(0)  # sleep-ok: a real suspension: other keys run now
            attempts[(k, s)] += 1
            if attempts[(k, s)] <= fails[(k, s)]:
                raise ConnectionError(f"{k}/{s} attempt {attempts[(k, s)]}")
            done[k].append(s)
        finally:
            running[k] -= 1
            busy -= 1

    bus.subscribe(LedgerEntry, handler)
    order = [(k, s) for s in range(per_key) for k in keys]
    rng.shuffle(order)
    # Shuffled across keys, in publish order within each key.
    next_seq: dict[str, int] = defaultdict(int)
    for k, _ in order:
        await bus.publish(LedgerEntry(k, next_seq[k], rng.randint(0, 4)))
        next_seq[k] += 1
    # Time moves only once nothing but backoff is left to run (handlers take no time next to
    # a backoff of seconds): a later event of a key that its retrying event did not hold back
    # would run in that gap.
    drained = asyncio.ensure_future(bus.drain())
    while not drained.done():
        quiet = 0
        while quiet < 5 and not drained.done():
            await asyncio.sleep(0)  # sleep-ok: loop ticks; no time passes on the bus clock
            quiet = quiet + 1 if busy == 0 else 0
        clock.advance(0.25)
    await drained

    assert wrong == []
    assert dict(done) == {k: list(range(per_key)) for k in keys}
    assert max_busy == 4  # the keys did run side by side on the 4 workers
    retried = sum(fails.values())
    assert retried > 50
    assert sum(attempts.values()) == len(fails) + retried
    stats = bus.get_statistics()
    assert (stats["retried"], stats["events_failed"], stats["dead_lettered"]) == (retried, retried, 0)
    assert clock.time() >= 3.0 and len(backoff_seen) > 10  # the backoff ran on the manual clock
