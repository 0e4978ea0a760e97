"""The circuit breaker: after N failures in a row a subscription waits out its cool-down,
then runs once half-open."""

from __future__ import annotations

from typing import Any

import pytest
from _failures import (
    Job,
    policy,
    quiet_oxbus_logs,  # noqa: F401 - an autouse fixture
    turns,
    until,
)
from oxbus import (
    CircuitBreaker,
)
from oxbus.testing import ManualClock


async def test_the_circuit_breaker_pauses_for_the_cool_down_after_n_failures(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[int, float]] = []
    broken = True

    async def flaky(event: Job) -> None:
        calls.append((event.n, clock.time()))
        if broken:
            raise ConnectionError("downstream down")

    bus.subscribe(Job, flaky, circuit_breaker=CircuitBreaker(failures=3, cool_down=10.0))
    for n in (1, 2, 3):
        await bus.publish(Job(n))
    await clock.drain(bus)
    assert calls == [(1, 0.0), (2, 0.0), (3, 0.0)]  # no retries burnt, no pause yet
    broken = False
    await bus.publish(Job(4))
    await bus.publish(Job(5))
    await until(lambda: clock.sleepers == 1, "the subscription to pause on the clock")
    await turns()
    assert len(calls) == 3  # open: events wait, none dropped
    clock.advance(9.5)
    await turns()
    assert len(calls) == 3 and clock.sleepers == 1
    clock.advance(0.5)
    await clock.drain(bus)
    assert calls[3:] == [(4, 10.0), (5, 10.0)]  # half-open call succeeded: closed again
    assert len(bus.dead_letters) == 3


async def test_a_success_resets_the_consecutive_failure_count(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[int, float]] = []

    async def handle(event: Job) -> None:
        calls.append((event.n, clock.time()))
        if event.n % 3 != 0:
            raise ConnectionError  # fails twice, then one success, repeatedly

    bus.subscribe(Job, handle, circuit_breaker=CircuitBreaker(failures=3, cool_down=10.0))
    for n in range(1, 10):
        await bus.publish(Job(n))
    await clock.drain(bus)
    assert [t for _, t in calls] == [0.0] * 9  # never two failures more than the limit
    assert clock.time() == 0.0


async def test_a_failure_while_half_open_opens_the_breaker_again(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[int, float]] = []

    async def handle(event: Job) -> None:
        calls.append((event.n, clock.time()))
        if event.n <= 3:
            raise ConnectionError

    bus.subscribe(Job, handle, circuit_breaker=CircuitBreaker(failures=2, cool_down=5.0))
    for n in range(1, 6):
        await bus.publish(Job(n))
    await clock.drain(bus)
    # 1, 2 fail: open until 5; 3 tried at 5 fails: open until 10; 4 at 10 succeeds; 5 at once.
    assert calls == [(1, 0.0), (2, 0.0), (3, 5.0), (4, 10.0), (5, 10.0)]


async def test_the_breaker_counts_failures_of_its_own_subscription_only(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[str, float]] = []

    async def guarded(event: Job) -> None:
        calls.append(("guarded", clock.time()))

    async def broken(event: Job) -> None:
        calls.append(("broken", clock.time()))
        raise ValueError

    bus.subscribe(Job, guarded, circuit_breaker=CircuitBreaker(failures=1, cool_down=60.0))
    bus.subscribe(Job, broken)
    for n in range(3):
        await bus.publish(Job(n))
    await clock.drain(bus)
    assert clock.time() == 0.0
    assert [c for c in calls if c[0] == "guarded"] == [("guarded", 0.0)] * 3


async def test_an_open_breaker_holds_back_retries_instead_of_burning_them(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    times: list[float] = []

    async def flaky(event: Job) -> None:
        times.append(clock.time())
        if len(times) < 4:
            raise ConnectionError

    bus.subscribe(
        Job,
        flaky,
        retry=policy(max_attempts=5, base_delay=1.0),
        circuit_breaker=CircuitBreaker(failures=2, cool_down=10.0),
    )
    await bus.publish(Job(1))
    await clock.drain(bus)
    # 0 fails, 1 fails (breaker opens until 11); the retry due at 3 waits until 11 and fails
    # (open until 21); the retry due at 15 waits until 21 and succeeds.
    assert times == [0.0, 1.0, 11.0, 21.0]
    assert len(bus.dead_letters) == 0


def test_circuit_breaker_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError, match="cool_down"):
        CircuitBreaker(failures=1, cool_down=-1)
