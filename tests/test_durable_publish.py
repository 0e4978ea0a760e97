"""`await publish()` on a durable bus commits on the asyncio thread itself when nothing waits
before it (src/store/now.rs, src/store/pacing.rs), else through a batch or the writer thread.
Whatever the path, an event is dispatched only once committed, and never overtakes one
published before it: not in the log, not in its handlers."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

import oxbus
from oxbus import EventBus, SqliteEventStore


@pytest.mark.parametrize("synchronous", ["normal", "full"])
@pytest.mark.parametrize("publishers", [1, 8])
async def test_concurrent_publishers_keep_publish_order_in_the_log_and_in_handlers(
    tmp_path: Path, synchronous: str, publishers: int
) -> None:
    store = SqliteEventStore(str(tmp_path / "order.db"), synchronous=synchronous)
    bus = EventBus(store=store, workers=4)
    handled: dict[str, list[tuple[int, int]]] = {}

    async def handler(event: dict[str, Any]) -> None:
        env = oxbus.current_envelope()
        assert env is not None and env.position is not None
        handled.setdefault(event["aggregate_id"], []).append((event["n"], env.position))
        await asyncio.sleep(0)  # sleep-ok: a real suspension, so keys overlap across workers

    bus.subscribe("step", handler, name="order")
    numbers = itertools.count()
    per_publisher = 400 // publishers

    async def publisher() -> None:
        for _ in range(per_publisher):
            n = next(numbers)  # publish order: the order of these calls
            assert await bus.publish({"event_type": "step", "aggregate_id": f"k{n % 5}", "n": n})

    async with bus:
        await asyncio.gather(*(publisher() for _ in range(publishers)))
        await bus.drain()
    total = per_publisher * publishers
    assert sum(len(v) for v in handled.values()) == total
    for key, seen in handled.items():
        ns = [n for n, _ in seen]
        positions = [p for _, p in seen]
        assert ns == sorted(ns), f"{key} handled out of publish order: {ns[:20]}"
        assert positions == sorted(positions), f"{key} logged out of publish order"
    async with SqliteEventStore(str(tmp_path / "order.db")) as again:
        logged = [e.data["n"] async for e in again.replay()]
    assert sorted(logged) == list(range(total))
    for k in range(5):
        mine = [n for n in logged if n % 5 == k]
        assert mine == sorted(mine)


async def test_a_publish_that_waits_settles_even_when_cancelled(tmp_path: Path) -> None:
    # A publisher cancelled while its commit is on the way does not keep later publishes from
    # committing at once (nor from being dispatched).
    bus = EventBus(store=str(tmp_path / "cancel.db"))
    seen: list[int] = []
    bus.subscribe("step", lambda e: seen.append(e["n"]), name="cancel")
    async with bus:
        tasks = [
            asyncio.create_task(bus.publish({"event_type": "step", "n": n})) for n in range(20)
        ]
        await asyncio.sleep(0)  # sleep-ok: every task runs its first step (and queues its log)
        for t in tasks[10:]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for n in range(20, 39):
            await bus.publish({"event_type": "step", "n": n})
        # Alone again, with nothing unsettled before it: committed at once, without suspending.
        last = bus.publish({"event_type": "step", "n": 39})
        with pytest.raises(StopIteration):
            last.send(None)
        await bus.drain()
    assert seen[:10] == list(range(10)) and seen[-20:] == list(range(20, 40))
