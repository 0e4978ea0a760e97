"""Backpressure: ``max_queue_size`` bounds what is queued; ``await publish()`` waits when full;
``publish_nowait()`` raises ``QueueFull``; publishing after ``stop()`` raises ``BusClosed``;
nothing is dropped silently."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oxbus import BusClosed, DomainEvent, EventBus, QueueFull
from oxbus.errors import OxbusError


class PressureEvent(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


async def let_the_loop_run(times: int = 20) -> None:
    """Yields to the loop without waiting for time (lets blocked tasks show they stay blocked)."""
    for _ in range(times):
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus


async def gated_bus(
    make_bus: Any, max_queue_size: int, workers: int = 1
) -> tuple[Any, Any, Any, list[int]]:
    """A bus whose only handler blocks on a gate; returns (bus, gate, started, handled)."""
    bus = await make_bus(workers=workers, max_queue_size=max_queue_size)
    gate = asyncio.Event()
    started = asyncio.Event()
    handled: list[int] = []

    async def handler(event: PressureEvent) -> None:
        started.set()
        await gate.wait()
        handled.append(event.n)

    bus.subscribe(PressureEvent, handler)
    return bus, gate, started, handled


async def test_publish_nowait_raises_queue_full_when_max_queue_size_events_are_queued(
    make_bus: Any,
) -> None:
    bus, gate, started, handled = await gated_bus(make_bus, max_queue_size=2)
    await bus.publish(PressureEvent(0))
    await asyncio.wait_for(started.wait(), 5)  # event 0 is in its handler, not queued
    bus.publish_nowait(PressureEvent(1))
    bus.publish_nowait(PressureEvent(2))
    assert bus.get_statistics()["queue_size"] == 2
    with pytest.raises(QueueFull) as info:
        bus.publish_nowait(PressureEvent(3))
    assert isinstance(info.value, asyncio.QueueFull)
    assert isinstance(info.value, OxbusError)
    assert "2" in str(info.value)
    gate.set()
    await bus.drain()
    assert handled == [0, 1, 2]  # 3 was refused loudly, never accepted
    assert bus.get_statistics()["events_published"] == 3


async def test_await_publish_waits_while_the_queue_is_full_and_nothing_is_dropped(
    make_bus: Any,
) -> None:
    bus, gate, started, handled = await gated_bus(make_bus, max_queue_size=2)
    await bus.publish(PressureEvent(0))
    await asyncio.wait_for(started.wait(), 5)
    await bus.publish(PressureEvent(1))
    await bus.publish(PressureEvent(2))
    blocked = [asyncio.create_task(bus.publish(PressureEvent(n))) for n in (3, 4, 5)]
    await let_the_loop_run()
    assert not any(t.done() for t in blocked)
    assert bus.get_statistics()["queue_size"] == 2
    gate.set()
    assert await asyncio.gather(*blocked) == [True, True, True]
    await bus.drain()
    assert handled == [0, 1, 2, 3, 4, 5]
    stats = bus.get_statistics()
    assert stats["events_published"] == 6
    assert stats["events_processed"] == 6


async def test_queue_size_never_exceeds_max_queue_size_under_a_flood(make_bus: Any) -> None:
    bus = await make_bus(workers=2, max_queue_size=10)
    peak = 0
    handled = 0

    async def handler(event: PressureEvent) -> None:
        nonlocal peak, handled
        peak = max(peak, bus.get_statistics()["queue_size"])
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        handled += 1

    bus.subscribe(PressureEvent, handler)

    async def producer(base: int) -> None:
        for i in range(500):
            await bus.publish(PressureEvent(base + i))
            peak_now = bus.get_statistics()["queue_size"]
            assert peak_now <= 10

    await asyncio.gather(*(producer(k * 1000) for k in range(4)))
    await bus.drain()
    assert handled == 2000
    assert peak <= 10


async def test_publish_many_waits_for_room_and_accepts_everything(make_bus: Any) -> None:
    bus = await make_bus(workers=1, max_queue_size=3)
    handled: list[int] = []

    async def handler(event: PressureEvent) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        handled.append(event.n)

    bus.subscribe(PressureEvent, handler)
    n = await bus.publish_many(PressureEvent(i) for i in range(100))
    assert n == 100
    await bus.drain()
    assert handled == list(range(100))


async def test_publish_after_stop_raises_bus_closed(make_bus: Any) -> None:
    bus = await make_bus()
    await bus.stop()
    with pytest.raises(BusClosed):
        await bus.publish(PressureEvent(1))
    with pytest.raises(BusClosed):
        bus.publish_nowait(PressureEvent(1))
    with pytest.raises(BusClosed):
        await bus.publish_batch([PressureEvent(1)])
    assert bus.get_statistics()["events_published"] == 0


async def test_stop_without_drain_fails_blocked_publishers_with_bus_closed(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus, gate, started, handled = await gated_bus(make_bus, max_queue_size=1)
    await bus.publish(PressureEvent(0))
    await asyncio.wait_for(started.wait(), 5)
    await bus.publish(PressureEvent(1))
    blocked = asyncio.create_task(bus.publish(PressureEvent(2)))
    await let_the_loop_run()
    assert not blocked.done()
    discarded = await bus.stop(drain=False, timeout=0.05)
    # the queued one, the blocked one, and the call still running when the timeout ran
    # out: reported, not silent
    assert discarded == 3
    with pytest.raises(BusClosed):
        await blocked
    gate.set()


async def test_unbounded_queue_with_max_queue_size_zero_accepts_without_waiting() -> None:
    bus = EventBus(max_queue_size=0)
    gate = asyncio.Event()

    async def handler(event: PressureEvent) -> None:
        await gate.wait()

    bus.subscribe(PressureEvent, handler)
    await bus.start()
    try:
        for i in range(5000):
            bus.publish_nowait(PressureEvent(i))
        assert bus.get_statistics()["events_published"] == 5000
        gate.set()
        await bus.drain()
    finally:
        await bus.stop()
