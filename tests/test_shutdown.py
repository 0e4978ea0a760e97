"""Graceful shutdown: stop() with and without draining, timeouts, what is discarded and
reported, durable delivery after a restart, cancelled publishers."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from _failures import (
    Job,
    quiet_oxbus_logs,  # noqa: F401 - an autouse fixture
    turns,
    until,
)
from oxbus import (
    BusClosed,
    EventBus,
)


async def test_stop_with_a_timeout_lets_in_flight_handlers_finish() -> None:
    bus = EventBus(workers=2)
    started = asyncio.Event()
    gate = asyncio.Event()
    finished: list[int] = []

    async def slow(event: Job) -> None:
        started.set()
        await gate.wait()
        finished.append(event.n)

    bus.subscribe(Job, slow)
    await bus.start()
    await bus.publish(Job(1))
    await bus.publish(Job(2))
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(bus.stop(timeout=10))
    await turns()
    assert not stopping.done()  # waiting for the handlers
    gate.set()
    assert await asyncio.wait_for(stopping, 10) == 0
    assert sorted(finished) == [1, 2]


async def test_stop_whose_timeout_runs_out_reports_the_queued_events_discarded() -> None:
    bus = EventBus(workers=1)
    started = asyncio.Event()
    observed: list[str] = []

    async def stuck(event: Job) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            observed.append(f"finally {event.n}")

    bus.subscribe(Job, stuck)
    await bus.start()
    for n in range(1, 6):
        await bus.publish(Job(n))
    await asyncio.wait_for(started.wait(), 5)
    # 4 queued events discarded + 1 handler call interrupted (cancelled: its finally ran).
    assert await bus.stop(timeout=0.1) == 5
    assert observed == ["finally 1"]
    assert not bus.is_running


async def test_stop_without_drain_returns_how_many_queued_events_were_discarded() -> None:
    bus = EventBus(workers=1)
    started = asyncio.Event()
    gate = asyncio.Event()
    handled: list[int] = []

    finished: list[int] = []

    async def blocked(event: Job) -> None:
        started.set()
        handled.append(event.n)
        await gate.wait()
        finished.append(event.n)

    bus.subscribe(Job, blocked)
    await bus.start()
    for n in range(10):
        await bus.publish(Job(n))
    await asyncio.wait_for(started.wait(), 5)
    # The running call may finish within the timeout; the 9 queued events are discarded.
    stopping = asyncio.create_task(bus.stop(drain=False, timeout=10))
    await turns()
    with pytest.raises(BusClosed):
        await bus.publish(Job(99))  # refused at once, while the running call finishes
    gate.set()
    assert await asyncio.wait_for(stopping, 20) == 9  # the queued ones, not the finished one
    assert handled == [0] and finished == [0]


async def test_stop_without_drain_on_an_idle_bus_discards_nothing() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(Job, lambda e: seen.append(e.n))
    await bus.start()
    await bus.publish(Job(1))
    await bus.drain()
    assert await bus.stop(drain=False) == 0
    assert seen == [1]


async def test_a_durable_bus_stopped_without_draining_delivers_the_rest_after_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stop.db"
    started = asyncio.Event()
    first_run: list[int] = []

    async def slow(event: Job) -> None:
        first_run.append(event.n)
        started.set()
        await asyncio.Event().wait()

    bus = EventBus(store=path, workers=1)
    bus.subscribe(Job, slow, name="worker")
    await bus.start()
    for n in range(1, 6):
        await bus.publish(Job(n, "K"))
    await asyncio.wait_for(started.wait(), 5)
    # Queued events are not handled; the running call gets 0.1 s, then is cancelled.
    await bus.stop(timeout=0.1, drain=False)
    assert first_run == [1]

    second_run: list[int] = []

    async def fast(event: Job) -> None:
        second_run.append(event.n)

    bus = EventBus(store=path, workers=1)
    bus.subscribe(Job, fast, name="worker")
    await bus.start()
    try:
        await bus.drain(timeout=10)
        # 1 was interrupted (never finished): delivered again; 2..5 were still queued.
        assert second_run == [1, 2, 3, 4, 5]
    finally:
        await bus.stop()


async def test_cancelling_a_publish_waiting_for_room_never_corrupts_the_bus() -> None:
    bus = EventBus(workers=1, max_queue_size=2)
    gate = asyncio.Event()
    handled: list[int] = []

    async def handle(event: Job) -> None:
        await gate.wait()
        handled.append(event.n)

    bus.subscribe(Job, handle)
    await bus.start()
    try:
        for n in (1, 2, 3):  # 1 in the handler, 2 and 3 fill the queue
            await bus.publish(Job(n))
        waiting = asyncio.create_task(bus.publish(Job(4)))
        await until(lambda: bus.get_statistics()["blocked_publishers"] == 1, "publish to block")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        assert await bus.publish(Job(5)) is True
        await bus.drain(timeout=10)
        assert handled == [1, 2, 3, 5]
        s = bus.get_statistics()
        assert s["events_published"] == 4 == s["events_processed"]
        assert s["queue_size"] == 0 and s["blocked_publishers"] == 0 and s["in_flight"] == 0
    finally:
        await bus.stop(timeout=5)


async def test_many_cancelled_publishers_leave_consistent_counts() -> None:
    rng = random.Random(4)
    bus = EventBus(workers=2, max_queue_size=3)
    gate = asyncio.Event()
    handled: list[int] = []

    async def handle(event: Job) -> None:
        if not gate.is_set():
            await gate.wait()
        handled.append(event.n)

    bus.subscribe(Job, handle)
    await bus.start()
    try:
        tasks = {n: asyncio.create_task(bus.publish(Job(n))) for n in range(200)}
        await turns()
        victims = rng.sample(sorted(tasks), 80)
        for i, n in enumerate(victims):
            tasks[n].cancel()
            if i == 40:
                gate.set()  # cancel some while the queue is moving
            if i % 7 == 0:
                await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        results = await asyncio.gather(*tasks.values(), return_exceptions=True)
        accepted = {n for n, r in zip(tasks, results) if r is True}
        cancelled = {n for n, r in zip(tasks, results) if isinstance(r, asyncio.CancelledError)}
        assert accepted | cancelled == set(tasks)
        assert len(cancelled) >= 40
        await bus.drain(timeout=10)
        assert len(handled) == len(set(handled))  # nothing twice
        # Nothing accepted was lost, and a cancelled publish was not accepted (README,
        # "Delivery"): exactly the accepted events were handled.
        assert set(handled) == accepted, (
            f"handled although their publish() raised CancelledError: "
            f"{sorted(set(handled) - accepted)}"
        )
        s = bus.get_statistics()
        assert s["events_published"] == len(handled) == s["events_processed"]
        assert s["queue_size"] == 0 and s["blocked_publishers"] == 0
        # The bus still works.
        await bus.publish_many(Job(n) for n in range(1000, 1010))
        await bus.drain(timeout=10)
        assert len(handled) == s["events_processed"] + 10
        assert sorted(handled[-10:]) == list(range(1000, 1010))
    finally:
        await bus.stop(timeout=5)
