"""Thread safety: ``publish_threadsafe`` from any thread returns a
``concurrent.futures.Future[bool]``; every event published that way is handled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest

from oxbus import BusNotStarted, DomainEvent, EventBus


class ThreadEvent(DomainEvent):
    def __init__(self, thread: int, seq: int) -> None:
        super().__init__()
        self.thread = thread
        self.seq = seq

    @property
    def aggregate_id(self) -> str:
        return f"t{self.thread}"


@pytest.mark.parametrize("workers", [1, 4])
async def test_publish_threadsafe_from_several_threads_handles_every_event(
    make_bus: Any, workers: int
) -> None:
    bus = await make_bus(workers=workers, max_queue_size=50)
    loop_thread = threading.get_ident()
    handled: dict[int, list[int]] = {t: [] for t in range(6)}
    handler_threads: set[int] = set()

    async def handler(event: ThreadEvent) -> None:
        handler_threads.add(threading.get_ident())
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        handled[event.thread].append(event.seq)

    bus.subscribe(ThreadEvent, handler)
    per_thread = 500
    results: dict[int, list[bool]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def producer(t: int) -> None:
        try:
            barrier.wait()
            futs = []
            for seq in range(per_thread):
                fut = bus.publish_threadsafe(ThreadEvent(t, seq))
                assert isinstance(fut, concurrent.futures.Future)
                futs.append(fut)
                if seq % 50 == 49:  # wait now and then so backpressure is exercised too
                    fut.result(timeout=30)
            results[t] = [f.result(timeout=30) for f in futs]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        await asyncio.to_thread(th.join, 60)
    assert errors == []
    assert all(results[t] == [True] * per_thread for t in range(6))
    await bus.drain()
    for t in range(6):
        # Each thread's events share a key and were published in order by that thread.
        assert handled[t] == list(range(per_thread)), f"thread {t}"
    assert handler_threads == {loop_thread}
    assert bus.get_statistics()["events_published"] == 6 * per_thread


async def test_publish_threadsafe_before_start_raises_bus_not_started() -> None:
    bus = EventBus()
    with pytest.raises(BusNotStarted):
        bus.publish_threadsafe(ThreadEvent(0, 0))


async def test_publish_threadsafe_from_a_plain_thread_with_its_own_loop(make_bus: Any) -> None:
    # A thread that runs its own asyncio loop (a common pattern in GUI apps) can publish too.
    bus = await make_bus()
    handled: list[int] = []

    async def handler(event: ThreadEvent) -> None:
        handled.append(event.seq)

    bus.subscribe(ThreadEvent, handler)

    def other_thread() -> list[bool]:
        async def main() -> list[bool]:
            futs = [bus.publish_threadsafe(ThreadEvent(9, i)) for i in range(20)]
            return [await asyncio.wrap_future(f) for f in futs]

        return asyncio.run(main())

    assert await asyncio.to_thread(other_thread) == [True] * 20
    await bus.drain()
    assert handled == list(range(20))
