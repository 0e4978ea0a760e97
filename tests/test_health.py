"""Health turns ``degraded`` at each documented threshold, end to end (README, "Statistics and
health"): the queue >= 80% full, the oldest queued event waited >= 5 s, >= 10% of handler calls
failed (after 20 calls), >= 100 dead letters (tests/test_dead_letters.py covers that one at
99 and 100); ``healthy`` just below each, and again once the cause is gone."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest

from oxbus import DomainEvent


class Job(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")  # the failures below are expected


async def test_the_documented_thresholds_are_the_ones_in_force(make_bus: Any) -> None:
    bus = await make_bus()
    assert bus.get_health_status()["thresholds"] == {
        "queue_fill": 0.8,
        "oldest_age_seconds": 5.0,
        "error_rate": 0.1,
        "min_calls": 20,
        "dead_letters": 100,
    }


async def test_a_queue_80_percent_full_degrades_and_79_does_not(make_bus: Any) -> None:
    bus = await make_bus(max_queue_size=10)
    gate = asyncio.Event()

    async def held(event: Job) -> None:
        await gate.wait()

    bus.subscribe(Job, held)
    await bus.publish(Job(0))  # taken by the one worker: in flight, not queued
    for n in range(1, 8):
        await bus.publish(Job(n))
    await asyncio.sleep(0)  # sleep-ok: one loop tick, so the worker has taken event 0
    h = bus.get_health_status()
    assert (h["queue_size"], h["in_flight"]) == (7, 1)
    assert (h["status"], h["reasons"]) == ("healthy", [])
    await bus.publish(Job(8))  # 8 of 10 queued: 80%
    h = bus.get_health_status()
    assert h["queue_size"] == 8
    assert (h["status"], h["reasons"]) == ("degraded", ["queue 8/10 is at or above 80% full"])
    gate.set()
    await bus.drain()
    h = bus.get_health_status()
    assert (h["status"], h["reasons"], h["queue_size"]) == ("healthy", [], 0)


async def test_an_event_queued_for_5_seconds_degrades(make_bus: Any) -> None:
    # The age is read on the process's monotonic clock, not the bus clock (a ManualClock does
    # not move it), so this test waits 5 real seconds.
    bus = await make_bus()
    gate = asyncio.Event()

    async def held(event: Job) -> None:
        await gate.wait()

    bus.subscribe(Job, held)
    await bus.publish(Job(0))  # in flight
    await bus.publish(Job(1))  # queued behind it
    await asyncio.sleep(0)  # sleep-ok: one loop tick, so the worker has taken event 0
    h = bus.get_health_status()
    assert (h["queue_size"], h["in_flight"]) == (1, 1)
    assert h["oldest_queued_age_seconds"] < 5.0
    assert (h["status"], h["reasons"]) == ("healthy", [])
    await asyncio.sleep(5.05)  # sleep-ok: the 5 s age threshold runs on the real clock
    h = bus.get_health_status()
    age = h["oldest_queued_age_seconds"]
    assert age >= 5.0
    assert h["status"] == "degraded"
    (reason,) = h["reasons"]
    waited = re.fullmatch(r"oldest queued event waited (\d+\.\d)s \(limit 5\.0s\)", reason)
    assert waited is not None, reason
    assert float(waited.group(1)) == pytest.approx(age, abs=0.06)
    gate.set()
    await bus.drain()
    h = bus.get_health_status()
    assert (h["status"], h["reasons"], h["oldest_queued_age_seconds"]) == ("healthy", [], 0.0)


async def test_ten_percent_failed_calls_degrade_once_20_calls_were_made(make_bus: Any) -> None:
    bus = await make_bus()

    async def handle(event: Job) -> None:
        if event.n < 0:
            raise ValueError(f"job {event.n}")

    bus.subscribe(Job, handle)
    # 2 of 19 calls failed (10.5%), but fewer than 20 calls: the rate does not count yet.
    await bus.publish_many([Job(-1), Job(-2)] + [Job(n) for n in range(17)])
    await bus.drain()
    h = bus.get_health_status()
    assert (h["status"], h["reasons"]) == ("healthy", [])
    # The 20th call: 2 of 20, exactly 10%.
    await bus.publish(Job(17))
    await bus.drain()
    h = bus.get_health_status()
    assert h["error_rate"] == pytest.approx(0.1)
    assert (h["status"], h["reasons"]) == (
        "degraded",
        ["2 of 20 handler calls failed (limit 10%)"],
    )
    # 2 of 21: under 10% again.
    await bus.publish(Job(18))
    await bus.drain()
    h = bus.get_health_status()
    assert (h["status"], h["reasons"]) == ("healthy", [])
    assert h["dead_letters"] == 2
