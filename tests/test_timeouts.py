"""Handler timeouts: an async handler over its timeout is cancelled and counted failed; hung
thread-pool handlers are abandoned and replaced."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from _failures import (
    Job,
    policy,
    quiet_oxbus_logs,  # noqa: F401 - an autouse fixture
    until,
)
from oxbus import (
    EventBus,
)


async def test_an_async_handler_over_its_timeout_is_cancelled_and_counted_failed(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    observed: list[str] = []

    async def slow(event: Job) -> None:
        try:
            await asyncio.sleep(3600)  # sleep-ok: a handler that hangs
        except asyncio.CancelledError:
            observed.append("cancelled")
            raise
        finally:
            observed.append("finally")

    bus.subscribe(Job, slow, timeout=0.05, name="slow")
    await bus.publish(Job(1))
    await bus.drain(timeout=10)
    assert observed == ["cancelled", "finally"]
    (dl,) = bus.dead_letters.list()
    assert dl.error_type == "TimeoutError"
    assert "slow" in dl.error_message and "0.05" in dl.error_message
    s = bus.get_statistics()
    assert s["events_failed"] == 1 and s["dead_lettered"] == 1


async def test_the_bus_handler_timeout_applies_and_a_timeout_is_retried(make_bus: Any) -> None:
    bus = await make_bus(handler_timeout=0.05, retry=policy(max_attempts=3, base_delay=0.001))
    attempts: list[int] = []

    async def slow_then_fast(event: Job) -> None:
        attempts.append(event.n)
        if len(attempts) < 3:
            await asyncio.sleep(3600)  # sleep-ok: a handler that hangs

    bus.subscribe(Job, slow_then_fast)
    await bus.publish(Job(1))
    await bus.drain(timeout=10)
    assert attempts == [1, 1, 1]
    assert len(bus.dead_letters) == 0
    assert bus.get_statistics()["events_failed"] == 2


async def test_a_fast_handler_is_not_affected_by_its_timeout(make_bus: Any) -> None:
    bus = await make_bus(handler_timeout=5.0)
    seen: list[int] = []

    async def quick(event: Job) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        seen.append(event.n)

    def sync_quick(event: Job) -> None:
        seen.append(-event.n)

    bus.subscribe(Job, quick)
    bus.subscribe(Job, sync_quick)
    for n in range(1, 4):
        await bus.publish(Job(n))
    await bus.drain()
    assert seen == [1, -1, 2, -2, 3, -3]
    assert bus.get_statistics()["events_failed"] == 0


async def test_hung_thread_pool_handlers_are_abandoned_replaced_and_shown_in_health() -> None:
    release = threading.Event()
    bus = EventBus(workers=2, sync_handlers="thread", thread_pool_size=2, handler_timeout=0.1)
    handled: list[int] = []
    hung_threads: list[str] = []

    def handler(event: Job) -> None:
        if event.n < 0:
            hung_threads.append(threading.current_thread().name)
            release.wait(60)
            return
        handled.append(event.n)

    bus.subscribe(Job, handler, name="sync")
    await bus.start()
    try:
        await bus.publish(Job(-1))
        await bus.publish(Job(-2))
        for n in range(1, 6):
            await bus.publish(Job(n))
        await bus.drain(timeout=10)
        assert sorted(handled) == [1, 2, 3, 4, 5]  # replacement threads did the work
        assert len(set(hung_threads)) == 2
        failed = bus.dead_letters.list()
        assert sorted(d.event.n for d in failed) == [-2, -1]
        assert {d.error_type for d in failed} == {"TimeoutError"}
        h = bus.get_health_status()
        assert h["abandoned_threads"] == 2
        assert h["abandoned_threads_total"] == 2
        assert h["thread_pool_size"] == 2
        assert h["status"] == "degraded"
        assert any("overran" in r for r in h["reasons"]), h["reasons"]
    finally:
        release.set()
    # Once the hung calls return, their threads are no longer counted as abandoned.
    await until(lambda: bus.get_health_status()["abandoned_threads"] == 0, "hung threads to end")
    h = bus.get_health_status()
    assert h["abandoned_threads_total"] == 2
    bus.dead_letters.purge()
    await bus.stop()
