"""A handler's own ``asyncio.timeout()`` / ``asyncio.wait_for`` inside a worker (issue 14).

Both cancel the *current* task, which for a handler is the worker's task, and take the request
back (``Task.uncancel()``) when they turn the ``CancelledError`` into ``TimeoutError``; since
Python 3.12 ``wait_for`` (and so the bus's own handler ``timeout=``) works this way too. Such a
cancellation is the handler's business: the worker must go on dispatching. Only a cancellation
still pending after the handler saw it (``stop()``) ends the worker.

Every class name starts with ``Tc`` (the registry is keyed by type key for the whole session).
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from oxbus import DomainEvent, RetryPolicy


@dataclass(frozen=True)
class Job(DomainEvent):
    n: int


async def _sleep_with_own_timeout(seconds: float, timeout: float) -> None:
    """``asyncio.timeout`` where it exists (3.11+), else ``wait_for`` (a task of its own on 3.10)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout):
            await asyncio.sleep(seconds)  # sleep-ok: outlasts its own timeout on purpose
    else:
        await asyncio.wait_for(asyncio.sleep(seconds), timeout)  # sleep-ok: as above


async def test_a_handler_that_catches_its_own_timeout_leaves_the_worker_dispatching(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=1)
    seen: list[tuple[int, str]] = []

    async def patient(event: Job) -> None:
        try:
            await _sleep_with_own_timeout(3600, 0.02)
        except asyncio.TimeoutError:  # not the builtin one on 3.10
            seen.append((event.n, "timed out"))
            return
        seen.append((event.n, "finished"))

    bus.subscribe(Job, patient)
    for n in range(3):
        await bus.publish(Job(n))
    await bus.drain(timeout=10)
    assert seen == [(0, "timed out"), (1, "timed out"), (2, "timed out")]
    s = bus.get_statistics()
    assert s["events_processed"] == 3
    assert s["events_failed"] == 0 and s["events_interrupted"] == 0


async def test_a_handler_failing_after_its_own_timeout_is_retried_like_any_failure(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=1, retry=RetryPolicy(max_attempts=2, base_delay=0.001))
    attempts: list[int] = []

    async def flaky(event: Job) -> None:
        attempts.append(event.n)
        if len(attempts) == 1:
            await _sleep_with_own_timeout(3600, 0.02)  # raises a TimeoutError: a failure

    bus.subscribe(Job, flaky)
    await bus.publish(Job(7))
    await bus.drain(timeout=10)
    assert attempts == [7, 7]
    assert len(bus.dead_letters) == 0
    s = bus.get_statistics()
    assert s["events_failed"] == 1 and s["retried"] == 1 and s["events_interrupted"] == 0


async def test_stop_still_interrupts_a_hung_handler_after_a_timeout_was_taken_back(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=1)
    started = asyncio.Event()
    observed: list[str] = []

    async def first_times_out_then_hangs(event: Job) -> None:
        try:
            await _sleep_with_own_timeout(3600, 0.02)
        except asyncio.TimeoutError:  # not the builtin one on 3.10
            pass
        started.set()
        try:
            await asyncio.sleep(3600)  # sleep-ok: a handler that hangs until stop()
        except asyncio.CancelledError:
            observed.append("cancelled")
            raise

    bus.subscribe(Job, first_times_out_then_hangs)
    await bus.publish(Job(1))
    await asyncio.wait_for(started.wait(), 10)
    assert await bus.stop(drain=False) == 1
    assert observed == ["cancelled"]
    s = bus.get_statistics()
    assert s["events_interrupted"] == 1 and s["events_failed"] == 0
