"""A bus that is stopped and dropped is collected, with its loop: a test suite that runs a loop
per test (pytest-asyncio) or an application that makes buses as it goes does not keep every
one of them, their handlers and their loops for ever. The engine's core holds Python objects
the garbage collector must see (src/python/bus/mod.rs `__traverse__`): its loop, its hooks
(one of them refers back to the bus), its handlers (which often refer to the bus)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from oxbus import DomainEvent, EventBus, SqliteEventStore


class Happened(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


def in_memory(_: Path) -> tuple[EventBus, Any]:
    return EventBus(), None


def threaded(_: Path) -> tuple[EventBus, Any]:
    return EventBus(workers=2, sync_handlers="thread"), None


def durable(tmp: Path) -> tuple[EventBus, Any]:
    store = SqliteEventStore(str(tmp / "collected.db"))
    return EventBus(store=store), store


@pytest.mark.parametrize("make", [in_memory, threaded, durable])
def test_a_stopped_bus_and_its_loop_are_collected(
    tmp_path: Path, make: Callable[[Path], tuple[EventBus, Any]]
) -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    buses: list[weakref.ref[EventBus]] = []
    handled = 0

    async def run() -> None:
        nonlocal handled
        loops.append(weakref.ref(asyncio.get_running_loop()))
        bus, store = make(tmp_path)
        buses.append(weakref.ref(bus))

        async def handler(e: Happened) -> None:
            nonlocal handled
            handled += 1
            if e.n == 0:
                await bus.publish(Happened(1))  # a handler that refers back to its bus

        def sync_handler(e: Happened) -> None:
            pass

        bus.subscribe(Happened, handler, name="h")
        bus.subscribe(Happened, sync_handler, name="s")
        async with bus:
            await bus.publish(Happened(0))
            await bus.drain()
            waiting = asyncio.ensure_future(bus.wait_for(Happened, timeout=30))
            await bus.publish(Happened(2))
            await waiting
            await bus.drain()
        if store is not None:
            store.close()

    for _ in range(3):
        asyncio.run(run())
    gc.collect()
    assert handled == 9
    alive_buses = sum(b() is not None for b in buses)
    alive_loops = sum(lp() is not None for lp in loops)
    assert (alive_buses, alive_loops) == (0, 0), (
        f"{alive_buses} of 3 buses and {alive_loops} of 3 loops still alive after they ended"
    )


def test_a_bus_left_running_when_its_loop_ended_is_collected() -> None:
    # Its worker tasks (cancelled by asyncio.run at the end) hold the workers, which hold the
    # core, whose handler refers back to the bus, which holds the tasks.
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    buses: list[weakref.ref[EventBus]] = []

    async def run() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        bus = EventBus(workers=2)
        buses.append(weakref.ref(bus))

        async def handler(e: Happened) -> None:
            if e.n == 0:
                await bus.publish(Happened(1))

        bus.subscribe(Happened, handler)
        await bus.start()
        await bus.publish(Happened(0))
        await bus.drain()

    for _ in range(3):
        asyncio.run(run())
    gc.collect()
    alive = (sum(b() is not None for b in buses), sum(lp() is not None for lp in loops))
    assert alive == (0, 0), f"buses and loops still alive: {alive}"
