"""Handlers: async and sync, on the loop or in a thread pool; a failing handler is counted and
logged and never reaches the publisher or the other handlers."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from typing import Any

import pytest

from oxbus import DomainEvent


class HandlerEvent(DomainEvent):
    def __init__(self, n: int, key: str | None = None) -> None:
        super().__init__()
        self.n = n
        self.key = key

    @property
    def aggregate_id(self) -> str | None:
        return self.key


async def test_async_and_sync_handlers_both_run_on_the_loop_thread_by_default(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2)
    loop_thread = threading.get_ident()
    threads: dict[str, int] = {}

    async def async_handler(event: HandlerEvent) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        threads["async"] = threading.get_ident()

    def sync_handler(event: HandlerEvent) -> None:
        threads["sync"] = threading.get_ident()

    bus.subscribe(HandlerEvent, async_handler)
    bus.subscribe(HandlerEvent, sync_handler)
    await bus.publish(HandlerEvent(1))
    await bus.drain()
    assert threads == {"async": loop_thread, "sync": loop_thread}


async def test_sync_handlers_thread_mode_runs_sync_handlers_off_the_loop_thread(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2, sync_handlers="thread")
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int, int]] = []

    def sync_handler(event: HandlerEvent) -> None:
        seen.append(("sync", event.n, threading.get_ident()))

    async def async_handler(event: HandlerEvent) -> None:
        seen.append(("async", event.n, threading.get_ident()))

    bus.subscribe(HandlerEvent, sync_handler)
    bus.subscribe(HandlerEvent, async_handler)
    for i in range(5):
        await bus.publish(HandlerEvent(i))
    await bus.drain()
    assert sorted((k, n) for k, n, _ in seen) == sorted(
        [("sync", i) for i in range(5)] + [("async", i) for i in range(5)]
    )
    assert all(t != loop_thread for k, _, t in seen if k == "sync")
    assert all(t == loop_thread for k, _, t in seen if k == "async")


async def test_threaded_sync_handler_does_not_block_the_loop(make_bus: Any) -> None:
    bus = await make_bus(workers=2, sync_handlers="thread")
    entered = threading.Event()
    ticked = threading.Event()
    finished: list[tuple[int, bool]] = []

    def blocking(event: HandlerEvent) -> None:
        entered.set()
        # Returns True only if the loop ticked while this call held its thread; a handler run
        # on the loop thread would block the ticks and see False after 10 s.
        finished.append((event.n, ticked.wait(10)))

    bus.subscribe(HandlerEvent, blocking, name="blocking")
    await bus.publish(HandlerEvent(1))
    assert await asyncio.to_thread(entered.wait, 10)
    for _ in range(5):
        await asyncio.sleep(0)  # sleep-ok: a loop tick, taken while the handler is in flight
        assert finished == []
        assert bus.get_statistics()["in_flight"] == 1
    ticked.set()
    await bus.drain(timeout=10)
    assert finished == [(1, True)]
    assert bus.dead_letters.list() == []
    stats = bus.get_statistics()
    assert (stats["events_processed"], stats["events_failed"], stats["in_flight"]) == (1, 0, 0)


async def test_partial_and_callable_objects_work_as_handlers(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[Any] = []

    async def tagged(tag: str, event: HandlerEvent) -> None:
        seen.append((tag, event.n))

    class CallableHandler:
        async def __call__(self, event: HandlerEvent) -> None:
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            seen.append(("callable", event.n))

    bus.subscribe(HandlerEvent, functools.partial(tagged, "partial"))
    bus.subscribe(HandlerEvent, CallableHandler())
    bus.subscribe(HandlerEvent, lambda e: seen.append(("lambda", e.n)))
    await bus.publish(HandlerEvent(1))
    await bus.drain()
    assert seen == [("partial", 1), ("callable", 1), ("lambda", 1)]


@pytest.mark.parametrize("mode", ["loop", "thread"])
async def test_raising_handler_never_reaches_the_publisher_or_other_handlers(
    make_bus: Any, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    bus = await make_bus(workers=2, sync_handlers=mode)
    seen: list[tuple[str, int]] = []

    async def before(event: HandlerEvent) -> None:
        seen.append(("before", event.n))

    async def async_boom(event: HandlerEvent) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        raise ValueError(f"async boom {event.n}")

    def sync_boom(event: HandlerEvent) -> None:
        raise LookupError(f"sync boom {event.n}")

    def after(event: HandlerEvent) -> None:
        seen.append(("after", event.n))

    bus.subscribe(HandlerEvent, before, priority=1)
    bus.subscribe(HandlerEvent, async_boom, priority=2)
    bus.subscribe(HandlerEvent, sync_boom, priority=3)
    bus.subscribe(HandlerEvent, after, priority=4)
    with caplog.at_level(logging.ERROR):
        results = [await bus.publish(HandlerEvent(i)) for i in range(3)]
        await bus.drain()
    assert results == [True, True, True]
    expected = [("before", i) for i in range(3)] + [("after", i) for i in range(3)]
    assert sorted(seen) == sorted(expected)
    stats = bus.get_statistics()
    assert stats["events_failed"] == 6
    assert stats["events_processed"] == 3
    messages = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for i in range(3):
        assert f"async boom {i}" in messages
        assert f"sync boom {i}" in messages
    assert "async_boom" in messages and "sync_boom" in messages


async def test_a_handler_that_raises_on_every_event_does_not_stop_the_workers(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await make_bus(workers=4)
    ok: list[int] = []

    async def boom(event: HandlerEvent) -> None:
        raise RuntimeError("always")

    async def fine(event: HandlerEvent) -> None:
        ok.append(event.n)

    bus.subscribe(HandlerEvent, boom)
    bus.subscribe(HandlerEvent, fine)
    with caplog.at_level(logging.CRITICAL + 1):  # silence 200 tracebacks
        for i in range(200):
            await bus.publish(HandlerEvent(i, key=f"k{i % 7}"))
        await bus.drain()
    assert sorted(ok) == list(range(200))
    assert bus.get_statistics()["events_failed"] == 200


async def test_handler_cancelling_itself_is_counted_as_a_failure_not_a_crash(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    bus = await make_bus()
    ok: list[int] = []

    async def cancels(event: HandlerEvent) -> None:
        raise asyncio.CancelledError()

    async def fine(event: HandlerEvent) -> None:
        ok.append(event.n)

    bus.subscribe(HandlerEvent, cancels)
    bus.subscribe(HandlerEvent, fine)
    with caplog.at_level(logging.CRITICAL + 1):
        await bus.publish(HandlerEvent(1))
        await bus.publish(HandlerEvent(2))
        await bus.drain(timeout=5)
    assert ok == [1, 2]
    assert bus.is_running
