"""Retries with backoff: retry_count, policies, jitter, retry_on, per-key order while a
retry waits, drain waiting for scheduled retries, the counters."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _failures import (
    Job,
    PaymentDeclined,
    policy,
    quiet_oxbus_logs,  # noqa: F401 - an autouse fixture
    turns,
)
from oxbus import (
    RetryPolicy,
)
from oxbus.testing import ManualClock


@pytest.mark.parametrize("n", [0, 1, 3])
async def test_retry_count_n_means_n_retries_after_the_first_attempt(make_bus: Any, n: int) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[int] = []

    async def always_fails(event: Job) -> None:
        calls.append(event.n)
        raise ValueError("down")

    bus.subscribe(Job, always_fails, retry_count=n, name="always_fails")
    await bus.publish(Job(1))
    await clock.drain(bus)
    assert len(calls) == n + 1
    (dl,) = bus.dead_letters.list()
    assert dl.attempts == n + 1
    s = bus.get_statistics()
    assert s["retried"] == n
    assert s["events_failed"] == n + 1
    assert s["dead_lettered"] == 1


async def test_retry_count_uses_the_bus_backoff(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(base_delay=2.0, multiplier=3.0))
    times: list[float] = []

    async def fails(event: Job) -> None:
        times.append(clock.time())
        raise ValueError

    bus.subscribe(Job, fails, retry_count=2)
    await bus.publish(Job(1))
    await clock.drain(bus)
    assert times == [0.0, 2.0, 8.0]  # 2 s, then 2 * 3 s


async def test_exponential_backoff_schedule_runs_on_the_manual_clock_instantly(
    make_bus: Any,
) -> None:
    clock = ManualClock()
    bus = await make_bus(
        clock=clock,
        retry=policy(max_attempts=6, base_delay=0.5, multiplier=2.0, max_delay=3.0),
    )
    times: list[float] = []

    async def fails(event: Job) -> None:
        times.append(clock.time())
        raise ConnectionError("still down")

    bus.subscribe(Job, fails)
    await bus.publish(Job(1))
    await clock.drain(bus)
    # Delays 0.5, 1, 2, then min(3, 4) = 3 and min(3, 8) = 3. The calls saw the manual clock
    # at each deadline: a backoff slept on the loop's real timers would leave it at 0.0.
    assert [b - a for a, b in zip(times, times[1:])] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert times == [0.0, 0.5, 1.5, 3.5, 6.5, 9.5]
    assert clock.time() == 9.5
    assert bus.dead_letters.list()[0].attempts == 6


async def test_the_same_schedule_twice_gives_the_same_call_times(make_bus: Any) -> None:
    runs = []
    for _ in range(2):
        clock = ManualClock()
        bus = await make_bus(clock=clock, retry=policy(max_attempts=4, base_delay=0.25))
        times: list[float] = []

        async def fails(
            event: Job, times: list[float] = times, clock: ManualClock = clock
        ) -> None:
            times.append(clock.time())
            raise ValueError

        bus.subscribe(Job, fails)
        await bus.publish(Job(1))
        await clock.drain(bus)
        runs.append(times)
    assert runs[0] == runs[1] == [0.0, 0.25, 0.75, 1.75]


async def test_jitter_scales_each_delay_within_its_band(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(
        clock=clock,
        retry=RetryPolicy(
            max_attempts=40, base_delay=1.0, multiplier=1.0, max_delay=1.0, jitter=0.5
        ),
    )
    times: list[float] = []

    async def fails(event: Job) -> None:
        times.append(clock.time())
        raise ValueError

    bus.subscribe(Job, fails)
    await bus.publish(Job(1))
    await clock.drain(bus)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 39
    assert all(0.5 - 1e-9 <= g <= 1.5 + 1e-9 for g in gaps), gaps
    assert len({round(g, 9) for g in gaps}) > 1, "jitter=0.5 should not give identical delays"


async def test_a_subscription_policy_overrides_the_bus_policy(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=2, base_delay=1.0))
    calls: dict[str, list[float]] = {"bus": [], "own": []}

    async def on_bus_policy(event: Job) -> None:
        calls["bus"].append(clock.time())
        raise ValueError

    async def on_own_policy(event: Job) -> None:
        calls["own"].append(clock.time())
        raise ValueError

    bus.subscribe(Job, on_bus_policy)
    bus.subscribe(Job, on_own_policy, retry=policy(max_attempts=3, base_delay=10.0))
    await bus.publish(Job(1))
    await clock.drain(bus)
    assert calls["bus"] == [0.0, 1.0]
    assert calls["own"] == [1.0, 11.0, 31.0]


async def test_the_failing_pair_is_retried_alone(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=4, base_delay=1.0))
    calls: list[str] = []

    async def first(event: Job) -> None:
        calls.append("first")

    async def flaky(event: Job) -> None:
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise ValueError("flaky")

    def last(event: Job) -> None:
        calls.append("last")

    bus.subscribe(Job, first, priority=0)
    bus.subscribe(Job, flaky, priority=1)
    bus.subscribe(Job, last, priority=2)
    await bus.publish(Job(1))
    await clock.drain(bus)
    assert calls == ["first", "flaky", "flaky", "flaky", "last"]
    assert len(bus.dead_letters) == 0
    s = bus.get_statistics()
    assert s["retried"] == 2 and s["events_failed"] == 2 and s["events_processed"] == 1


async def test_retry_on_limits_which_exceptions_are_retried(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(
        clock=clock,
        retry=policy(max_attempts=4, base_delay=1.0, retry_on=(ConnectionError, TimeoutError)),
    )
    calls: dict[int, int] = {}
    raises: dict[int, BaseException] = {
        1: ValueError("bad data"),  # not retried
        2: ConnectionError("down"),  # retried
        3: ConnectionRefusedError("refused"),  # a subclass: retried
        4: PaymentDeclined("no"),  # not retried
    }

    async def handle(event: Job) -> None:
        calls[event.n] = calls.get(event.n, 0) + 1
        raise raises[event.n]

    bus.subscribe(Job, handle)
    for n in raises:
        await bus.publish(Job(n))
    await clock.drain(bus)
    assert calls == {1: 1, 2: 4, 3: 4, 4: 1}
    attempts = {d.event.n: d.attempts for d in bus.dead_letters.list()}
    assert attempts == {1: 1, 2: 4, 3: 4, 4: 1}
    assert bus.get_statistics()["retried"] == 6


async def test_retry_on_accepts_a_single_class_and_refuses_non_exceptions() -> None:
    assert RetryPolicy(retry_on=KeyError).retry_on == (KeyError,)
    with pytest.raises(ValueError, match="retry_on"):
        RetryPolicy(retry_on=(KeyError, "oops"))  # type: ignore[arg-type]


async def test_with_keys_later_events_of_the_key_wait_for_the_retrying_one(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(workers=4, clock=clock, retry=policy(max_attempts=3, base_delay=5.0))
    seen: list[tuple[str, int, float]] = []
    a1_failed = asyncio.Event()
    others = asyncio.Event()

    async def handle(event: Job) -> None:
        if event.key == "A" and event.n == 1 and sum(1 for s in seen if s[:2] == ("A!", 1)) < 2:
            seen.append(("A!", 1, clock.time()))
            a1_failed.set()
            raise ConnectionError("transient")
        seen.append((event.key or "", event.n, clock.time()))
        if {(k, n) for k, n, _ in seen} >= {("B", 1), ("B", 2), ("C", 1)}:
            others.set()

    bus.subscribe(Job, handle)
    for key, n in [("A", 1), ("A", 2), ("B", 1), ("B", 2), ("C", 1)]:
        await bus.publish(Job(n, key))
    await asyncio.wait_for(asyncio.gather(a1_failed.wait(), others.wait()), 5)
    await turns()
    # A1 waits for its retry (the clock has not moved): A2 waits behind it, B and C proceeded.
    assert clock.time() == 0.0
    assert ("A", 2) not in {(k, n) for k, n, _ in seen}
    assert [n for k, n, _ in seen if k == "B"] == [1, 2]  # in order within their key
    assert [n for k, n, _ in seen if k == "C"] == [1]
    await clock.drain(bus)
    a = [(k, n, t) for k, n, t in seen if k.startswith("A")]
    assert a == [("A!", 1, 0.0), ("A!", 1, 5.0), ("A", 1, 15.0), ("A", 2, 15.0)]


async def test_without_ordering_a_retrying_event_does_not_hold_back_its_key(make_bus: Any) -> None:
    # The choice: ordered=False gives up per-key order, so later events of the key proceed.
    clock = ManualClock()
    bus = await make_bus(
        workers=4, ordered=False, clock=clock, retry=policy(max_attempts=2, base_delay=5.0)
    )
    seen: list[tuple[int, float]] = []
    a2 = asyncio.Event()

    async def handle(event: Job) -> None:
        if event.n == 1 and not any(n == -1 for n, _ in seen):
            seen.append((-1, clock.time()))
            raise ConnectionError
        seen.append((event.n, clock.time()))
        if event.n == 2:
            a2.set()

    bus.subscribe(Job, handle)
    await bus.publish(Job(1, "A"))
    await bus.publish(Job(2, "A"))
    await asyncio.wait_for(a2.wait(), 5)
    assert (2, 0.0) in seen and (1, 0.0) not in seen
    await clock.drain(bus)
    assert seen[-1] == (1, 5.0)


async def test_drain_waits_for_a_scheduled_retry(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=3, base_delay=1.0))
    calls: list[float] = []

    async def flaky(event: Job) -> None:
        calls.append(clock.time())
        if len(calls) < 3:
            raise ConnectionError

    bus.subscribe(Job, flaky)
    await bus.publish(Job(1))
    # The clock does not move: the retry stays scheduled and drain() must not return.
    with pytest.raises(TimeoutError, match="waiting to retry"):
        await bus.drain(timeout=0.2)
    assert bus.get_statistics()["retry_queue_size"] == 1
    await clock.drain(bus)
    assert calls == [0.0, 1.0, 3.0]
    assert bus.get_statistics()["retry_queue_size"] == 0


async def test_drain_waits_for_retries_with_the_real_clock(make_bus: Any) -> None:
    bus = await make_bus(retry=policy(max_attempts=3, base_delay=0.02))
    calls: list[int] = []

    async def flaky(event: Job) -> None:
        calls.append(event.n)
        if len(calls) < 3:
            raise ConnectionError

    bus.subscribe(Job, flaky)
    await bus.publish(Job(1))
    await bus.drain(timeout=10)
    assert calls == [1, 1, 1]
    assert len(bus.dead_letters) == 0


async def test_statistics_count_retries_dead_letters_and_failed_calls(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=3, base_delay=1.0))
    attempts: dict[int, int] = {}

    async def handle(event: Job) -> None:
        attempts[event.n] = attempts.get(event.n, 0) + 1
        if event.n == 2 and attempts[2] == 1:
            raise ValueError("once")
        if event.n == 3:
            raise ValueError("always")

    async def fine(event: Job) -> None:
        pass

    bus.subscribe(Job, handle)
    bus.subscribe(Job, fine)
    for n in (1, 2, 3):
        await bus.publish(Job(n))
    await clock.drain(bus)
    s = bus.get_statistics()
    assert s["events_published"] == 3
    assert s["events_processed"] == 3  # every subscription finished (success or final failure)
    assert s["events_failed"] == 1 + 3  # every failed attempt
    assert s["retried"] == 1 + 2  # retry attempts scheduled
    assert s["dead_lettered"] == 1
    assert s["failed_events_count"] == 1
    assert s["retry_queue_size"] == 0
