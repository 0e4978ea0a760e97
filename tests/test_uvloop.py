"""The same basic flow on uvloop (DESIGN.md: "Any asyncio loop")."""

from __future__ import annotations

import asyncio
import random
import threading
from collections import defaultdict
from typing import Any, Awaitable, Callable, TypeVar

import pytest
from _env import unavailable

import oxbus
from oxbus import DomainEvent, EventBus, EventBusManager, InMemoryEventBus, QueueFull

try:
    import uvloop
except ImportError as e:
    unavailable(f"uvloop is not importable ({e}); pip install uvloop", module=True)

T = TypeVar("T")


def run_on_uvloop(main: Callable[[], Awaitable[T]]) -> T:
    async def checked() -> T:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return await main()

    # uvloop.run: asyncio.Runner on a uvloop loop (which 3.10, without Runner, lacks).
    result: T = uvloop.run(checked())
    return result


class Event(DomainEvent):
    def __init__(self, key: str, seq: int) -> None:
        super().__init__()
        self.key = key
        self.seq = seq

    @property
    def aggregate_id(self) -> str:
        return self.key


class Child(DomainEvent):
    pass


def test_basic_flow_on_uvloop() -> None:
    bus = InMemoryEventBus(worker_count=4, max_queue_size=16)  # built outside any loop
    order: dict[str, list[int]] = defaultdict(list)
    active: dict[str, int] = defaultdict(int)
    overlap: list[str] = []
    envs: list[Any] = []
    rng = random.Random(3)

    async def handler(event: Event) -> None:
        active[event.key] += 1
        if active[event.key] > 1:
            overlap.append(event.key)
        for _ in range(rng.randint(1, 4)):
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        order[event.key].append(event.seq)
        active[event.key] -= 1
        if event.seq == 0:
            await bus.publish(Child())

    def on_child(event: Child) -> None:
        env = oxbus.current_envelope()
        envs.append((env.correlation_id, env.causation_id, event.causation_id))

    bus.subscribe(Event, handler)
    bus.subscribe(Child, on_child)

    async def main() -> dict[str, Any]:
        async with EventBusManager(bus):
            assert bus.get_statistics()["worker_count"] == 4
            results = [await bus.publish(Event(f"k{i % 5}", i)) for i in range(500)]
            assert results == [True] * 500
            await bus.drain()
            return bus.get_statistics()

    stats = run_on_uvloop(main)
    for k in range(5):
        assert order[f"k{k}"] == list(range(k, 500, 5))
    assert overlap == []
    assert stats["events_published"] == 501
    assert stats["events_processed"] == 501
    assert len(envs) == 1
    corr, cause, attr = envs[0]
    assert corr == cause == attr  # the root (seq 0) published the child


def test_backpressure_drain_and_wait_for_on_uvloop() -> None:
    async def main() -> None:
        bus = EventBus(workers=1, max_queue_size=1)
        gate = asyncio.Event()
        started = asyncio.Event()
        seen: list[int] = []

        async def handler(event: Event) -> None:
            started.set()
            await gate.wait()
            seen.append(event.seq)

        bus.subscribe(Event, handler)
        async with bus:
            await bus.publish(Event("a", 0))
            await asyncio.wait_for(started.wait(), 5)
            await bus.publish(Event("a", 1))
            with pytest.raises(QueueFull):
                bus.publish_nowait(Event("a", 2))
            blocked = asyncio.create_task(bus.publish(Event("a", 3)))
            for _ in range(10):
                await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            assert not blocked.done()
            with pytest.raises(TimeoutError):
                await bus.drain(timeout=0.05)
            waiter = asyncio.create_task(bus.wait_for(Event, lambda e: e.seq == 4, timeout=5))
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            gate.set()
            assert await blocked is True
            await bus.publish(Event("a", 4))
            assert (await waiter).seq == 4
            await bus.drain(timeout=5)
        assert seen == [0, 1, 3, 4]

    run_on_uvloop(main)


def test_publish_threadsafe_on_uvloop() -> None:
    async def main() -> None:
        bus = EventBus(workers=2)
        seen: list[int] = []

        async def handler(event: Event) -> None:
            seen.append(event.seq)

        bus.subscribe(Event, handler)
        async with bus:

            def produce() -> list[bool]:
                futs = [bus.publish_threadsafe(Event("t", i)) for i in range(200)]
                return [f.result(timeout=30) for f in futs]

            t = threading.Thread(target=produce)
            t.start()
            await asyncio.to_thread(t.join, 30)
            await bus.drain()
        assert seen == list(range(200))

    run_on_uvloop(main)
