"""Thread safety: ``publish_threadsafe`` from any thread returns a
``concurrent.futures.Future[bool]``; every event published that way is handled."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import pytest

from oxbus import BusClosed, BusNotStarted, DomainEvent, EventBus


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


# A fresh interpreter per run: the deadlock needed pyo3's first `intern!` of a call site (which
# gives up the GIL while it initialises) to happen under the bus lock while another thread,
# holding the GIL, waited for that lock. Only the first events of a process can show it.
_RACE = r"""
import asyncio, sys, threading
from oxbus import EventBus, BusClosed

async def main():
    bus = EventBus(workers=int(sys.argv[1]), store=sys.argv[2] or None)
    handled = 0
    def handler(event):
        nonlocal handled
        handled += 1
    bus.subscribe("race", handler)
    await bus.start()
    await asyncio.sleep(0)  # sleep-ok: lets the worker tasks take their first step and go idle
    spinning = threading.Barrier(9)
    futures = []
    def publisher(t):
        spinning.wait()
        for i in range(300):
            bus.is_running  # the getter takes the bus lock while holding the GIL
            futures.append(bus.publish_threadsafe({"event_type": "race", "t": t, "i": i}))
    threads = [threading.Thread(target=publisher, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    spinning.wait()  # every publisher is running: the loop's first publishes race them
    for i in range(300):
        await bus.publish({"event_type": "race", "i": i})
    for th in threads:
        await asyncio.to_thread(th.join)
    results = [await asyncio.wrap_future(f) for f in futures]
    await bus.drain()
    await bus.stop()
    assert results == [True] * 2400, results.count(True)
    assert handled == 2700, handled
    print("ok")

asyncio.run(main())
"""


@pytest.mark.parametrize("durable", [False, True])
def test_threads_publishing_while_the_loop_publishes_its_first_events_never_deadlock(
    tmp_path: Any, durable: bool
) -> None:
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(_RACE)
    hung = []
    for run in range(16):
        db = str(tmp_path / f"race-{run}.db") if durable else ""
        try:
            out = subprocess.run(
                [sys.executable, str(script), str(1 + run % 2 * 3), db],
                capture_output=True, text=True, timeout=30,
            )
        except subprocess.TimeoutExpired:
            hung.append(run)
            continue
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert hung == [], f"{len(hung)} of 16 fresh processes hung"


async def test_stop_under_publishing_tasks_handles_every_event_a_publish_accepted() -> None:
    # stop() used to drain first and close intake after: publishes in between returned True
    # and were then discarded. Intake now closes first: every publish either returned True
    # (and its event is handled) or raised BusClosed.
    bus = EventBus(workers=2, max_queue_size=64)
    handled: list[tuple[int, int]] = []
    enough = asyncio.Event()

    async def handler(event: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension inside the handler
        handled.append(event["id"])
        if len(handled) == 500:
            enough.set()

    bus.subscribe("work", handler)
    await bus.start()
    accepted: list[tuple[int, int]] = []
    refused: list[BaseException] = []

    async def publisher(t: int) -> None:
        for i in range(10**9):
            try:
                await bus.publish({"event_type": "work", "id": (t, i)})
            except BusClosed as e:
                refused.append(e)
                return
            accepted.append((t, i))

    tasks = [asyncio.create_task(publisher(t)) for t in range(8)]
    await enough.wait()
    discarded = await bus.stop(timeout=5)
    await asyncio.gather(*tasks)
    assert discarded == 0
    assert len(refused) == 8  # each publisher learnt the bus stopped
    assert sorted(handled) == sorted(accepted)
    assert bus.get_statistics()["events_published"] == len(accepted)


def test_publish_threadsafe_futures_all_resolve_when_the_bus_stops_or_its_loop_ends() -> None:
    # Futures used to stay pending for ever when stop() or the loop's end overtook them.
    for stop in (True, False):
        bus = EventBus()
        handled: list[int] = []
        bus.subscribe("tick", lambda e: handled.append(e["n"]))
        futures: list[concurrent.futures.Future[bool]] = []
        started = threading.Event()
        done = threading.Event()
        late: list[BaseException] = []

        def publisher() -> None:
            n = 0
            while not done.is_set():
                try:
                    futures.append(bus.publish_threadsafe({"event_type": "tick", "n": n}))
                except (BusClosed, BusNotStarted) as e:
                    late.append(e)
                    return
                n += 1
                if n == 200:
                    started.set()

        th = threading.Thread(target=publisher)

        async def main() -> None:
            await bus.start()
            th.start()
            await asyncio.to_thread(started.wait, 30)
            if stop:
                await bus.stop()
            # else: asyncio.run ends with the bus running; its loop closes under the thread

        asyncio.run(main())
        done.set()
        th.join(30)
        assert not th.is_alive()
        ok = 0
        for f in futures:
            try:
                assert f.result(timeout=10) is True
                ok += 1
            except (BusClosed, concurrent.futures.CancelledError):
                pass
        if stop:  # stop() drains: every accepted event was handled
            assert ok == len(handled), (ok, len(handled))
        assert late, "the thread was told the bus is gone"
