"""A bus that is stopped and dropped is collected, with its loop: a test suite that runs a loop
per test (pytest-asyncio) or an application that makes buses as it goes does not keep every
one of them, their handlers and their loops for ever. The engine's core holds Python objects
the garbage collector must see (src/python/bus/mod.rs `__traverse__`): its loop, its hooks
(one of them refers back to the bus), its handlers (which often refer to the bus).

The same holds of a bus on a broker (Redis Streams, RabbitMQ) and of a bridge (Redis Pub/Sub,
AMQP), stopped or left running when their loop ended: their transport's core holds the loop
and the callback its messages go to (a method of the object that holds that core) until
`stop()`, so it shows them to the collector and lets go of them when cleared or dropped
(src/python/transport/inbox.rs). And of a store used without a bus (its core holds the futures
of its requests and, through them, their loop). The broker cases talk to the Redis on
127.0.0.1:6379 and the RabbitMQ on 127.0.0.1:5672: skipped when unreachable, except under
``OXBUS_CI=1`` where they fail."""

from __future__ import annotations

import asyncio
import gc
import socket
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _env import unavailable
from _redis import URL as REDIS_URL
from _redis import Resp, redis_ping
from oxbus import AmqpBridge, DomainEvent, EventBus, RedisPubSubBridge, SqliteEventStore

RABBIT_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


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


class Relayed(DomainEvent):
    """Through a broker: rebuilt from its payload on the way back."""

    def __init__(self, n: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.n = n


def _collected_after(run: Callable[[], Any]) -> tuple[int, int]:
    """Runs ``run()`` (a coroutine function making one bus, bridge or store) in three loops one
    after the other -> how many of what it made and of the loops are alive after a collection."""
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    made: list[weakref.ref[Any]] = []

    async def one() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        made.append(weakref.ref(await run()))

    for _ in range(3):
        asyncio.run(one())
    gc.collect()
    # A reference the runtime's threads let go of without the GIL (the loop and a future of
    # a one-off await cancelled with its loop) is released by pyo3 at the next call into the
    # engine: make one (EventBus() makes its core) before looking.
    EventBus()
    gc.collect()
    return sum(m() is not None for m in made), sum(lp() is not None for lp in loops)


async def _relay_through(bus: EventBus, *, stop: bool = True) -> EventBus:
    """Starts ``bus``, publishes an event whose handler publishes another through the bus
    (a handler that refers back to its bus), waits for the second and drains; then stops the
    bus, unless ``stop`` is false (it is left running when its loop ends)."""
    second = asyncio.Event()

    async def handler(e: Relayed) -> None:
        if e.n == 0:
            await bus.publish(Relayed(1))
        else:
            second.set()

    bus.subscribe(Relayed, handler, name="relay")
    await bus.start()
    await bus.publish(Relayed(0))
    await asyncio.wait_for(second.wait(), 20)  # the broker's round trip, twice
    await bus.drain(10)
    if stop:
        await bus.stop(timeout=10)
    return bus


@pytest.mark.parametrize("stop", [True, False], ids=["stopped", "left_running"])
def test_a_bus_on_redis_streams_and_its_loop_are_collected(stop: bool) -> None:
    # Left running, its transport's core holds the bus's delivery callback (-> the bus ->
    # that core): kept for ever before the core showed it to the collector.
    reason = redis_ping()
    if reason is not None:
        unavailable(reason)
    streams: list[str] = []

    def make() -> EventBus:
        # A stream per bus: one left running would take the next one's events.
        streams.append(f"oxbus-test:{uuid.uuid4().hex}")
        return EventBus(transport=REDIS_URL, group="g", stream=streams[-1])

    try:
        alive = _collected_after(lambda: _relay_through(make(), stop=stop))
    finally:
        r = Resp()
        for stream in streams:
            r.delete_prefix(stream)
        r.close()
    assert alive == (0, 0), f"buses and loops still alive after they ended: {alive}"


def _reachable(port: int, what: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as e:
        unavailable(f"{what} at 127.0.0.1:{port} is unreachable ({e})")


async def _delete_rabbit(exchanges: list[str], group: str) -> None:
    aio_pika = pytest.importorskip("aio_pika", reason="aio-pika (a test dependency) is missing")
    conn = await aio_pika.connect(RABBIT_URL)
    ch = await conn.channel()
    for exchange in exchanges:
        queue = f"{exchange}.{group}"
        for name in (queue, f"{queue}.dead"):
            await ch.queue_delete(name)
        await ch.exchange_delete(exchange)
    await conn.close()


@pytest.mark.parametrize("stop", [True, False], ids=["stopped", "left_running"])
def test_a_bus_on_rabbitmq_and_its_loop_are_collected(stop: bool) -> None:
    _reachable(5672, "RabbitMQ")
    exchanges: list[str] = []

    def make() -> EventBus:
        # An exchange (and queue) per bus: one left running would take the next one's events.
        exchanges.append(f"oxbus-test.{uuid.uuid4().hex[:12]}")
        return EventBus(transport=RABBIT_URL, group="g", exchange=exchanges[-1])

    try:
        alive = _collected_after(lambda: _relay_through(make(), stop=stop))
    finally:
        asyncio.run(_delete_rabbit(exchanges, "g"))
    assert alive == (0, 0), f"buses and loops still alive after they ended: {alive}"


@pytest.mark.parametrize("stop", [True, False], ids=["stopped", "left_running"])
@pytest.mark.parametrize("kind", ["redis_pubsub", "amqp"])
def test_a_bridge_its_bus_and_their_loop_are_collected(kind: str, stop: bool) -> None:
    # The bridge's core holds its message callback (-> the bridge -> that core) until
    # stop(): left running, kept for ever before the core showed it to the collector.
    _reachable(6379 if kind == "redis_pubsub" else 5672, kind)
    tag = uuid.uuid4().hex[:12]

    async def use() -> Any:
        bus = EventBus()
        bridge: Any
        if kind == "redis_pubsub":
            bridge = RedisPubSubBridge(bus, REDIS_URL)
            bridge.subscribe_channel(f"oxbus-test-in:{tag}", to=None)
            bridge.publish_to(f"oxbus-test-out:{tag}", Happened)
        else:
            bridge = AmqpBridge(bus, RABBIT_URL)  # the default exchange drops unroutable ones
            bridge.publish_to("", f"oxbus-test-nowhere.{tag}", Happened)
        await bus.start()
        await bridge.start()
        await bus.publish(Happened(0))  # out through the bridge
        await bus.drain(10)
        if stop:
            await bridge.stop()
            await bus.stop(timeout=10)
        return bridge

    alive = _collected_after(use)
    assert alive == (0, 0), f"bridges and loops still alive after they ended: {alive}"


def test_a_closed_store_used_without_a_bus_and_its_loop_are_collected(tmp_path: Path) -> None:
    async def use() -> SqliteEventStore:
        store = SqliteEventStore(str(tmp_path / "alone.db"))
        version = await store.version("s")
        await store.append("s", [Happened(version)], expected_version=version)
        await store.append("s", [Happened(version + 1), Happened(version + 2)])
        assert [e.event.n for e in await store.read("s", version + 1)] == [version + 1, version + 2]
        store.close()
        return store

    alive = _collected_after(use)
    assert alive == (0, 0), f"stores and loops still alive after they ended: {alive}"
