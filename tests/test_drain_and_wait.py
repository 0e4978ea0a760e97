"""Waiting without sleeps: ``drain(timeout=)``, ``wait_for(type, predicate, timeout)``, and
``stop()`` draining by default (seed 000, problem #4)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oxbus import DomainEvent, EventBus, EventBusFactory, QueueFull


class WaitEvent(DomainEvent):
    def __init__(self, n: int, key: str | None = None) -> None:
        super().__init__()
        self.n = n
        self.key = key

    @property
    def aggregate_id(self) -> str | None:
        return self.key


class OtherWaitEvent(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


async def test_drain_returns_once_every_published_event_is_handled(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    handled: list[int] = []

    async def handler(event: WaitEvent) -> None:
        for _ in range(event.n % 5):
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        handled.append(event.n)

    bus.subscribe(WaitEvent, handler)
    for i in range(300):
        await bus.publish(WaitEvent(i, key=f"k{i % 9}"))
    await bus.drain()
    assert sorted(handled) == list(range(300))
    stats = bus.get_statistics()
    assert stats["events_processed"] == 300
    assert stats["queue_size"] == 0


async def test_drain_on_an_idle_bus_returns_at_once(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[int] = []
    bus.subscribe(WaitEvent, lambda e: seen.append(e.n))

    async def done_within_one_tick(timeout: float | None) -> None:
        drained = asyncio.ensure_future(bus.drain(timeout=timeout))
        await asyncio.sleep(0)  # sleep-ok: one loop tick, in which the drain task runs once
        assert drained.done(), "drain() of an idle bus waited for something"
        assert drained.result() is None

    for timeout in (None, 0.5, 0.0):
        await done_within_one_tick(timeout)
    # Idle again once the work is done.
    await bus.publish(WaitEvent(1))
    await bus.drain()
    await done_within_one_tick(None)
    assert seen == [1]


async def test_drain_includes_events_published_by_handlers(make_bus: Any) -> None:
    bus = await make_bus(workers=2)
    seen: list[int] = []

    async def cascade(event: WaitEvent) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        seen.append(event.n)
        if event.n < 20:
            await bus.publish(WaitEvent(event.n + 1))

    bus.subscribe(WaitEvent, cascade)
    await bus.publish(WaitEvent(0))
    await bus.drain()
    assert seen == list(range(21))


async def test_drain_timeout_raises_timeout_error_while_a_handler_hangs(make_bus: Any) -> None:
    bus = await make_bus()
    never = asyncio.Event()
    entered = asyncio.Event()

    async def hangs(event: WaitEvent) -> None:
        entered.set()
        await never.wait()

    bus.subscribe(WaitEvent, hangs)
    await bus.publish(WaitEvent(1))
    await asyncio.wait_for(entered.wait(), 5)
    with pytest.raises(TimeoutError):
        await bus.drain(timeout=0.1)
    assert bus.is_running  # a drain timeout does not stop anything
    never.set()  # cleanup: let the handler finish
    await bus.drain(timeout=5)


async def test_wait_for_resolves_with_the_first_matching_event_published_after_the_call(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    await bus.publish(WaitEvent(1))  # before the call: never the answer
    await bus.drain()
    # wait_for listens from the moment it is called: no yield needed before publishing.
    waiter = asyncio.create_task(bus.wait_for(WaitEvent, lambda e: e.n % 2 == 0, timeout=5))
    await bus.publish(OtherWaitEvent(2))  # wrong type
    await bus.publish(WaitEvent(3))  # fails the predicate
    fourth = WaitEvent(4)
    await bus.publish(fourth)
    await bus.publish(WaitEvent(6))
    assert await waiter is fourth


async def test_wait_for_without_predicate_matches_by_type_string(make_bus: Any) -> None:
    bus = await make_bus()
    waiter = asyncio.create_task(bus.wait_for("order.#", timeout=5))
    await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
    await bus.publish({"event_type": "invoice.sent"})
    event = {"event_type": "order.placed", "id": 1}
    await bus.publish(event)
    assert await waiter is event


async def test_wait_for_resolves_when_the_event_is_accepted_before_its_handlers(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    gate = asyncio.Event()
    handled: list[int] = []

    async def slow(event: WaitEvent) -> None:
        await gate.wait()
        handled.append(event.n)

    bus.subscribe(WaitEvent, slow)
    waiter = asyncio.create_task(bus.wait_for(WaitEvent, timeout=5))
    await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
    await bus.publish(WaitEvent(9))
    got = await waiter
    assert got.n == 9
    assert handled == []
    gate.set()
    await bus.drain()
    assert handled == [9]


async def test_wait_for_times_out_with_timeout_error(make_bus: Any) -> None:
    bus = await make_bus()
    with pytest.raises(TimeoutError):
        await bus.wait_for(WaitEvent, timeout=0.05)


async def test_wait_for_never_resolves_with_an_event_the_bus_refused(make_bus: Any) -> None:
    # Contract: wait_for resolves "as soon as the bus accepts it". An event refused with
    # QueueFull was not accepted and must not be reported as published.
    bus = await make_bus(max_queue_size=1)
    gate = asyncio.Event()
    started = asyncio.Event()

    async def handler(event: WaitEvent) -> None:
        started.set()
        await gate.wait()

    bus.subscribe(WaitEvent, handler)
    await bus.publish(WaitEvent(0))
    await asyncio.wait_for(started.wait(), 5)
    await bus.publish(WaitEvent(1))  # fills the queue
    waiter = asyncio.create_task(bus.wait_for(WaitEvent, timeout=0.2))
    await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
    with pytest.raises(QueueFull):
        bus.publish_nowait(WaitEvent(2))
    try:
        with pytest.raises(TimeoutError):
            await waiter
    finally:
        gate.set()


async def test_wait_for_ignores_a_publish_refused_because_the_bus_is_not_started() -> None:
    bus = EventBus()
    waiter = asyncio.create_task(bus.wait_for(WaitEvent, timeout=0.2))
    await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
    with pytest.raises(RuntimeError):
        await bus.publish(WaitEvent(1))
    with pytest.raises(TimeoutError):
        await waiter


async def test_stop_drains_by_default() -> None:
    bus = EventBus(workers=3)
    handled: list[int] = []

    async def handler(event: WaitEvent) -> None:
        for _ in range(4):
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        handled.append(event.n)

    bus.subscribe(WaitEvent, handler)
    await bus.start()
    for i in range(100):
        await bus.publish(WaitEvent(i, key=f"k{i % 5}"))
    await bus.stop()
    assert sorted(handled) == list(range(100))
    assert bus.get_statistics()["events_processed"] == 100
    assert not bus.is_running


async def test_seed_problem_4_events_are_processed_after_drain_with_no_sleep() -> None:
    # Seed 000, problem #4: the old tests needed asyncio.sleep(0.1) after publish.  # sleep-ok: prose
    bus = EventBusFactory.create_in_memory_event_bus(worker_count=2)
    processed: list[WaitEvent] = []

    async def handler(event: WaitEvent) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        processed.append(event)

    bus.subscribe(WaitEvent, handler)
    await bus.start()
    try:
        event = WaitEvent(1)
        await bus.publish(event)
        await bus.drain()
        assert processed == [event]
    finally:
        await bus.stop()
