"""Failures handled like a production bus (issue 4): retries with backoff, the dead-letter
queue, parking keys behind dead letters, timeouts, the circuit breaker, graceful shutdown.

Backoff and cool-downs run on ``oxbus.testing.ManualClock`` (``await clock.drain(bus)``), so a
schedule of seconds completes in no real time and every call time is exact. Timeouts need real
time (they are about a handler overrunning the wall clock) and use tens of milliseconds.

Every class name starts with ``Fi4`` (the registry is keyed by type key for the whole session).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
from oxbus import (
    BusClosed,
    CircuitBreaker,
    DeadLetter,
    DomainEvent,
    EventBus,
    ProcessingResult,
    RetryPolicy,
)
from oxbus.testing import ManualClock

# --- events, exceptions, helpers -------------------------------------------------------------


class Fi4Job(DomainEvent):
    """A numbered job; ``key`` is its ordering key (``aggregate_id``)."""

    def __init__(self, n: int, key: str | None = None) -> None:
        super().__init__()
        self.n = n
        self.key = key

    @property
    def aggregate_id(self) -> str | None:
        return self.key


class Fi4Other(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


class Fi4PaymentDeclined(Exception):
    """A user exception, for the qualified ``error_type``."""


class Fi4Outer:
    class Nested(Exception):
        """A nested user exception: its qualified name includes the outer class."""


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Handler failures are logged at ERROR with a traceback: expected here, kept out of output.
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Lets the loop run until ``cond()`` holds (a bound on real time, for conditions set by
    threads or by the bus's own tasks, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)  # sleep-ok: the handler's simulated work


async def turns(n: int = 20) -> None:
    """Lets every ready task run ``n`` loop turns (no time passes on any clock)."""
    for _ in range(n):
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus


def policy(**kw: Any) -> RetryPolicy:
    kw.setdefault("jitter", 0.0)
    return RetryPolicy(**kw)


def utc(dt: datetime) -> bool:
    return dt.tzinfo is not None and dt.utcoffset() == timedelta(0)


# =============================================================================================
# 1. Retries
# =============================================================================================


@pytest.mark.parametrize("n", [0, 1, 3])
async def test_retry_count_n_means_n_retries_after_the_first_attempt(make_bus: Any, n: int) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[int] = []

    async def always_fails(event: Fi4Job) -> None:
        calls.append(event.n)
        raise ValueError("down")

    bus.subscribe(Fi4Job, always_fails, retry_count=n, name="always_fails")
    await bus.publish(Fi4Job(1))
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

    async def fails(event: Fi4Job) -> None:
        times.append(clock.time())
        raise ValueError

    bus.subscribe(Fi4Job, fails, retry_count=2)
    await bus.publish(Fi4Job(1))
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

    async def fails(event: Fi4Job) -> None:
        times.append(clock.time())
        raise ConnectionError("still down")

    bus.subscribe(Fi4Job, fails)
    await bus.publish(Fi4Job(1))
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

        async def fails(event: Fi4Job, times: list[float] = times, clock: ManualClock = clock) -> None:
            times.append(clock.time())
            raise ValueError

        bus.subscribe(Fi4Job, fails)
        await bus.publish(Fi4Job(1))
        await clock.drain(bus)
        runs.append(times)
    assert runs[0] == runs[1] == [0.0, 0.25, 0.75, 1.75]


async def test_jitter_scales_each_delay_within_its_band(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(
        clock=clock,
        retry=RetryPolicy(max_attempts=40, base_delay=1.0, multiplier=1.0, max_delay=1.0, jitter=0.5),
    )
    times: list[float] = []

    async def fails(event: Fi4Job) -> None:
        times.append(clock.time())
        raise ValueError

    bus.subscribe(Fi4Job, fails)
    await bus.publish(Fi4Job(1))
    await clock.drain(bus)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 39
    assert all(0.5 - 1e-9 <= g <= 1.5 + 1e-9 for g in gaps), gaps
    assert len({round(g, 9) for g in gaps}) > 1, "jitter=0.5 should not give identical delays"


async def test_a_subscription_policy_overrides_the_bus_policy(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=2, base_delay=1.0))
    calls: dict[str, list[float]] = {"bus": [], "own": []}

    async def on_bus_policy(event: Fi4Job) -> None:
        calls["bus"].append(clock.time())
        raise ValueError

    async def on_own_policy(event: Fi4Job) -> None:
        calls["own"].append(clock.time())
        raise ValueError

    bus.subscribe(Fi4Job, on_bus_policy)
    bus.subscribe(Fi4Job, on_own_policy, retry=policy(max_attempts=3, base_delay=10.0))
    await bus.publish(Fi4Job(1))
    await clock.drain(bus)
    assert calls["bus"] == [0.0, 1.0]
    assert calls["own"] == [1.0, 11.0, 31.0]


async def test_the_failing_pair_is_retried_alone(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=4, base_delay=1.0))
    calls: list[str] = []

    async def first(event: Fi4Job) -> None:
        calls.append("first")

    async def flaky(event: Fi4Job) -> None:
        calls.append("flaky")
        if calls.count("flaky") < 3:
            raise ValueError("flaky")

    def last(event: Fi4Job) -> None:
        calls.append("last")

    bus.subscribe(Fi4Job, first, priority=0)
    bus.subscribe(Fi4Job, flaky, priority=1)
    bus.subscribe(Fi4Job, last, priority=2)
    await bus.publish(Fi4Job(1))
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
        4: Fi4PaymentDeclined("no"),  # not retried
    }

    async def handle(event: Fi4Job) -> None:
        calls[event.n] = calls.get(event.n, 0) + 1
        raise raises[event.n]

    bus.subscribe(Fi4Job, handle)
    for n in raises:
        await bus.publish(Fi4Job(n))
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

    async def handle(event: Fi4Job) -> None:
        if event.key == "A" and event.n == 1 and sum(1 for s in seen if s[:2] == ("A!", 1)) < 2:
            seen.append(("A!", 1, clock.time()))
            a1_failed.set()
            raise ConnectionError("transient")
        seen.append((event.key or "", event.n, clock.time()))
        if {(k, n) for k, n, _ in seen} >= {("B", 1), ("B", 2), ("C", 1)}:
            others.set()

    bus.subscribe(Fi4Job, handle)
    for key, n in [("A", 1), ("A", 2), ("B", 1), ("B", 2), ("C", 1)]:
        await bus.publish(Fi4Job(n, key))
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

    async def handle(event: Fi4Job) -> None:
        if event.n == 1 and not any(n == -1 for n, _ in seen):
            seen.append((-1, clock.time()))
            raise ConnectionError
        seen.append((event.n, clock.time()))
        if event.n == 2:
            a2.set()

    bus.subscribe(Fi4Job, handle)
    await bus.publish(Fi4Job(1, "A"))
    await bus.publish(Fi4Job(2, "A"))
    await asyncio.wait_for(a2.wait(), 5)
    assert (2, 0.0) in seen and (1, 0.0) not in seen
    await clock.drain(bus)
    assert seen[-1] == (1, 5.0)


async def test_drain_waits_for_a_scheduled_retry(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=3, base_delay=1.0))
    calls: list[float] = []

    async def flaky(event: Fi4Job) -> None:
        calls.append(clock.time())
        if len(calls) < 3:
            raise ConnectionError

    bus.subscribe(Fi4Job, flaky)
    await bus.publish(Fi4Job(1))
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

    async def flaky(event: Fi4Job) -> None:
        calls.append(event.n)
        if len(calls) < 3:
            raise ConnectionError

    bus.subscribe(Fi4Job, flaky)
    await bus.publish(Fi4Job(1))
    await bus.drain(timeout=10)
    assert calls == [1, 1, 1]
    assert len(bus.dead_letters) == 0


async def test_statistics_count_retries_dead_letters_and_failed_calls(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=3, base_delay=1.0))
    attempts: dict[int, int] = {}

    async def handle(event: Fi4Job) -> None:
        attempts[event.n] = attempts.get(event.n, 0) + 1
        if event.n == 2 and attempts[2] == 1:
            raise ValueError("once")
        if event.n == 3:
            raise ValueError("always")

    async def fine(event: Fi4Job) -> None:
        pass

    bus.subscribe(Fi4Job, handle)
    bus.subscribe(Fi4Job, fine)
    for n in (1, 2, 3):
        await bus.publish(Fi4Job(n))
    await clock.drain(bus)
    s = bus.get_statistics()
    assert s["events_published"] == 3
    assert s["events_processed"] == 3  # every subscription finished (success or final failure)
    assert s["events_failed"] == 1 + 3  # every failed attempt
    assert s["retried"] == 1 + 2  # retry attempts scheduled
    assert s["dead_lettered"] == 1
    assert s["failed_events_count"] == 1
    assert s["retry_queue_size"] == 0


# =============================================================================================
# 2. Dead letters
# =============================================================================================


async def _dead_letter_of(bus: EventBus, clock: ManualClock, exc: BaseException) -> tuple[Fi4Job, DeadLetter]:
    async def handle_payment(event: Fi4Job) -> None:
        raise exc

    bus.subscribe(Fi4Job, handle_payment, name="payments", retry=policy(max_attempts=3, base_delay=1.0))
    event = Fi4Job(7, "acct-1")
    await bus.publish(event)
    await clock.drain(bus)
    (dl,) = bus.dead_letters.list()
    return event, dl


async def test_a_dead_letter_keeps_the_event_subscription_attempts_times_and_error(
    make_bus: Any,
) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    before = datetime.now(timezone.utc)
    event, dl = await _dead_letter_of(bus, clock, Fi4PaymentDeclined("card 4242 declined"))
    after = datetime.now(timezone.utc)
    assert isinstance(dl, DeadLetter)
    assert isinstance(dl.id, str) and dl.id
    assert dl.event is event and dl.event.event_id == event.event_id
    assert dl.subscription == "payments"
    assert dl.attempts == 3
    assert utc(dl.first_failed_at) and utc(dl.last_failed_at)
    assert before <= dl.first_failed_at <= dl.last_failed_at <= after
    assert dl.error_type == f"{Fi4PaymentDeclined.__module__}.Fi4PaymentDeclined"
    assert dl.error_message == "card 4242 declined"
    assert isinstance(dl.traceback, str) and "Fi4PaymentDeclined" in dl.traceback


async def test_a_dead_letter_traceback_shows_where_the_handler_raised(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    _, dl = await _dead_letter_of(bus, clock, Fi4PaymentDeclined("declined"))
    assert dl.traceback.startswith("Traceback (most recent call last):"), dl.traceback
    assert "handle_payment" in dl.traceback  # the frame that raised
    assert "raise exc" in dl.traceback  # and its source line


async def test_a_dead_letter_names_builtin_and_nested_error_types(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)

    async def builtin(event: Fi4Job) -> None:
        raise KeyError("k")

    async def nested(event: Fi4Job) -> None:
        raise Fi4Outer.Nested("inner")

    bus.subscribe(Fi4Job, builtin, name="builtin")
    bus.subscribe(Fi4Job, nested, name="nested")
    await bus.publish(Fi4Job(1))
    await clock.drain(bus)
    types = {d.subscription: d.error_type for d in bus.dead_letters.list()}
    assert types == {
        "builtin": "KeyError",
        "nested": f"{Fi4Outer.__module__}.Fi4Outer.Nested",
    }


async def test_first_failed_at_is_before_last_failed_at_across_real_retries(make_bus: Any) -> None:
    bus = await make_bus(retry=policy(max_attempts=3, base_delay=0.02))

    async def fails(event: Fi4Job) -> None:
        raise ValueError

    bus.subscribe(Fi4Job, fails)
    await bus.publish(Fi4Job(1))
    await bus.drain(timeout=10)
    (dl,) = bus.dead_letters.list()
    assert dl.last_failed_at - dl.first_failed_at >= timedelta(seconds=0.05)


async def test_retrying_one_dead_letter_redispatches_to_its_subscription_only(make_bus: Any) -> None:
    bus = await make_bus()
    calls: list[tuple[str, int]] = []
    broken = True

    async def ok(event: Fi4Job) -> None:
        calls.append(("ok", event.n))

    async def shaky(event: Fi4Job) -> None:
        calls.append(("shaky", event.n))
        if broken:
            raise ConnectionError("down")

    bus.subscribe(Fi4Job, ok)
    bus.subscribe(Fi4Job, shaky, name="shaky")
    await bus.publish(Fi4Job(1))
    await bus.publish(Fi4Job(2))
    await bus.drain()
    first, second = bus.dead_letters.list()
    assert (first.event.n, second.event.n) == (1, 2)
    calls.clear()
    broken = False
    assert await bus.dead_letters.retry(first) == 1
    await bus.drain()
    assert calls == [("shaky", 1)]
    assert [d.event.n for d in bus.dead_letters.list()] == [2]
    calls.clear()
    assert await bus.dead_letters.retry(second.id) == 1  # by id too
    await bus.drain()
    assert calls == [("shaky", 2)]
    assert len(bus.dead_letters) == 0
    assert bus.get_statistics()["failed_events_count"] == 0


async def test_retrying_all_dead_letters_sends_each_to_its_own_subscription(make_bus: Any) -> None:
    bus = await make_bus()
    calls: list[tuple[str, int]] = []
    broken = True

    def make(tag: str) -> Any:
        async def handle(event: Any) -> None:
            calls.append((tag, event.n))
            if broken:
                raise ValueError(tag)

        return handle

    bus.subscribe(Fi4Job, make("job"), name="job")
    bus.subscribe(Fi4Other, make("other"), name="other")
    await bus.publish(Fi4Job(1))
    await bus.publish(Fi4Other(2))
    await bus.publish(Fi4Job(3))
    await bus.drain()
    assert len(bus.dead_letters) == 3
    calls.clear()
    broken = False
    assert await bus.dead_letters.retry() == 3
    await bus.drain()
    assert sorted(calls) == [("job", 1), ("job", 3), ("other", 2)]
    assert len(bus.dead_letters) == 0


async def test_a_retried_dead_letter_that_fails_again_comes_back(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock, retry=policy(max_attempts=2, base_delay=1.0))
    calls: list[float] = []

    async def fails(event: Fi4Job) -> None:
        calls.append(clock.time())
        raise ValueError("still")

    bus.subscribe(Fi4Job, fails)
    await bus.publish(Fi4Job(1))
    await clock.drain(bus)
    (old,) = bus.dead_letters.list()
    assert await bus.dead_letters.retry(old) == 1
    await clock.drain(bus)
    (new,) = bus.dead_letters.list()
    assert len(calls) == 4  # the retry ran its own full schedule
    assert new.attempts == 2 and new.event is old.event
    assert bus.get_statistics()["dead_lettered"] == 2


async def test_discarding_a_dead_letter_drops_it_without_a_call(make_bus: Any) -> None:
    bus = await make_bus()
    calls: list[int] = []

    async def fails(event: Fi4Job) -> None:
        calls.append(event.n)
        raise ValueError

    bus.subscribe(Fi4Job, fails)
    await bus.publish(Fi4Job(1))
    await bus.publish(Fi4Job(2))
    await bus.drain()
    first, second = bus.dead_letters.list()
    assert bus.dead_letters.discard(first) == 1
    await bus.drain()
    assert calls == [1, 2]
    assert bus.dead_letters.list() == [second]
    with pytest.raises(KeyError):
        bus.dead_letters.discard(first.id)
    with pytest.raises(KeyError):
        await bus.dead_letters.retry("no-such-id")


async def test_purge_empties_the_dead_letter_queue_and_returns_the_count(make_bus: Any) -> None:
    bus = await make_bus()

    async def fails(event: Fi4Job) -> None:
        raise ValueError

    bus.subscribe(Fi4Job, fails)
    for n in range(5):
        await bus.publish(Fi4Job(n))
    await bus.drain()
    assert len(bus.dead_letters) == 5
    assert bus.dead_letters.purge() == 5
    assert bus.dead_letters.list() == [] and len(bus.dead_letters) == 0
    assert bus.get_failed_events() == []
    assert bus.dead_letters.purge() == 0


async def test_get_failed_events_has_the_replaced_bus_shape(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    event, dl = await _dead_letter_of(bus, clock, ConnectionError("gateway down"))
    (entry,) = bus.get_failed_events()
    assert set(entry) == {"event", "subscription", "final_result", "failed_at"}
    assert entry["event"] is event
    assert entry["subscription"].name == "payments"
    r = entry["final_result"]
    assert isinstance(r, ProcessingResult)
    assert r.success is False
    assert r.event_id == event.event_id
    assert "gateway down" in (r.error_message or "")
    assert r.retry_attempt == 2  # the third attempt
    assert r.subscription == "payments"
    assert isinstance(entry["failed_at"], datetime) and utc(entry["failed_at"])
    assert entry["failed_at"] == dl.last_failed_at


async def test_health_degrades_when_the_dead_letter_queue_reaches_its_threshold(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    limit = bus.get_health_status()["thresholds"]["dead_letters"]
    assert isinstance(limit, int) and limit > 0

    async def fine(event: Fi4Other) -> None:
        pass

    async def fails(event: Fi4Job) -> None:
        raise ValueError

    bus.subscribe(Fi4Other, fine)
    bus.subscribe(Fi4Job, fails)
    # Enough successful calls that the error rate stays far below its threshold.
    await bus.publish_many(Fi4Other(i) for i in range(limit * 20))
    await bus.publish_many(Fi4Job(i) for i in range(limit - 1))
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "healthy", h["reasons"]
    assert h["dead_letters"] == limit - 1
    await bus.publish(Fi4Job(limit))
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "degraded"
    assert any("dead letter" in r for r in h["reasons"]), h["reasons"]
    bus.dead_letters.purge()
    assert bus.get_health_status()["status"] == "healthy"


async def test_health_degrades_when_the_error_rate_passes_ten_percent(make_bus: Any) -> None:
    bus = await make_bus()
    h = bus.get_health_status()
    assert h["thresholds"]["error_rate"] == pytest.approx(0.1)
    min_calls = h["thresholds"]["min_calls"]

    async def handle(event: Fi4Job) -> None:
        if event.n < 0:
            raise ValueError

    bus.subscribe(Fi4Job, handle)
    await bus.publish_many(Fi4Job(i) for i in range(max(min_calls, 30) - 2))
    await bus.publish_many([Fi4Job(-1), Fi4Job(-2)])  # 2 of 30: under 10 %
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "healthy", h["reasons"]
    await bus.publish_many([Fi4Job(-3), Fi4Job(-4)])  # 4 of 32: 12.5 %
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "degraded"
    assert any("failed" in r for r in h["reasons"]), h["reasons"]


async def test_dead_letters_of_a_durable_bus_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    calls: list[int] = []
    broken = True

    async def billing(event: Fi4Job) -> None:
        calls.append(event.n)
        if broken:
            raise Fi4PaymentDeclined(f"declined {event.n}")

    bus = EventBus(store=path, retry=policy(max_attempts=2, base_delay=0.001))
    bus.subscribe(Fi4Job, billing, name="billing")
    await bus.start()
    original = Fi4Job(1, "acct-9")
    await bus.publish(original)
    await bus.publish(Fi4Job(2, "acct-9"))
    await bus.drain(timeout=10)
    before = [(d.event.n, d.attempts, d.error_type) for d in bus.dead_letters.list()]
    await bus.stop()
    assert calls == [1, 1, 2, 2]
    assert len(before) == 2

    calls.clear()
    bus = EventBus(store=path)
    bus.subscribe(Fi4Job, billing, name="billing")
    await bus.start()
    try:
        await bus.drain(timeout=10)
        assert calls == []  # a dead letter is not redelivered by the restart
        entries = bus.dead_letters.list()
        assert [(d.event.n, d.attempts, d.error_type) for d in entries] == before
        first = entries[0]
        assert isinstance(first.event, Fi4Job)
        assert first.event.event_id == original.event_id
        assert first.subscription == "billing"
        assert first.error_type == f"{Fi4PaymentDeclined.__module__}.Fi4PaymentDeclined"
        assert first.error_message == "declined 1"
        assert utc(first.first_failed_at) and first.first_failed_at <= first.last_failed_at
        assert "Fi4PaymentDeclined" in first.traceback
        assert len(bus.get_failed_events()) == 2
        broken = False
        assert await bus.dead_letters.retry(first) == 1
        await bus.drain(timeout=10)
        assert calls == [1]
        assert bus.dead_letters.purge() == 1
    finally:
        await bus.stop()

    bus = EventBus(store=path)
    bus.subscribe(Fi4Job, billing, name="billing")
    await bus.start()
    try:
        await bus.drain(timeout=10)
        assert len(bus.dead_letters) == 0  # the retry and the purge reached the file
        assert calls == [1]
    finally:
        await bus.stop()


async def test_get_failed_events_after_a_durable_restart_keeps_the_final_result(
    tmp_path: Path,
) -> None:
    # DESIGN: final_result is the last attempt's ProcessingResult (success False); the entries
    # are the same as bus.dead_letters, which survive a restart.
    path = tmp_path / "final.db"

    async def fails(event: Fi4Job) -> None:
        raise ConnectionError("gateway down")

    event = Fi4Job(1)
    for run in range(2):
        bus = EventBus(store=path, retry=policy(max_attempts=2, base_delay=0.001))
        bus.subscribe(Fi4Job, fails, name="payments")
        await bus.start()
        try:
            if run == 0:
                await bus.publish(event)
            await bus.drain(timeout=10)
            (entry,) = bus.get_failed_events()
        finally:
            await bus.stop()
        r = entry["final_result"]
        assert isinstance(r, ProcessingResult), f"run {run}: final_result is {r!r}"
        assert r.success is False and r.event_id == event.event_id
        assert "gateway down" in (r.error_message or "")
        assert r.retry_attempt == 1 and r.subscription == "payments"


# =============================================================================================
# 3. Parking keys behind dead letters
# =============================================================================================


async def _park_setup(make_bus: Any, mode: str = "park") -> tuple[EventBus, list[tuple[str, int]], dict[str, bool]]:
    bus = await make_bus(workers=2, ordered=True)
    seen: list[tuple[str, int]] = []
    state = {"broken": True}

    async def ledger(event: Fi4Job) -> None:
        if state["broken"] and event.key == "K" and event.n == 1:
            raise ValueError("K1 is poison")
        seen.append((event.key or "", event.n))

    bus.subscribe(Fi4Job, ledger, name="ledger", on_dead_letter=mode)
    for key, n in [("K", 1), ("K", 2), ("L", 1), ("K", 3), ("L", 2)]:
        await bus.publish(Fi4Job(n, key))
    await bus.drain()
    return bus, seen, state


async def test_park_sends_later_events_of_the_key_behind_the_dead_letter(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus)
    assert seen == [("L", 1), ("L", 2)]  # other keys proceed
    head, *parked = bus.dead_letters.list()
    assert (head.event.key, head.event.n, head.error_type) == ("K", 1, "ValueError")
    assert head.parked_behind is None
    assert [(p.event.key, p.event.n) for p in parked] == [("K", 2), ("K", 3)]
    for p in parked:
        assert p.error_type == "oxbus.Parked"
        assert p.parked_behind == head.id
        assert p.subscription == "ledger"
        assert head.id in p.error_message
    assert bus.get_statistics()["dead_lettered"] == 3


async def test_retrying_the_head_redispatches_it_then_the_parked_events_in_order(
    make_bus: Any,
) -> None:
    bus, seen, state = await _park_setup(make_bus)
    head = bus.dead_letters.list()[0]
    seen.clear()
    state["broken"] = False
    assert await bus.dead_letters.retry(head) == 3
    await bus.drain()
    assert seen == [("K", 1), ("K", 2), ("K", 3)]
    assert len(bus.dead_letters) == 0
    # The key is unparked: a new event of K is handled at once.
    await bus.publish(Fi4Job(4, "K"))
    await bus.drain()
    assert seen[-1] == ("K", 4) and len(bus.dead_letters) == 0


async def test_retrying_a_head_that_fails_again_parks_the_rest_again(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus)
    head = bus.dead_letters.list()[0]
    seen.clear()
    assert await bus.dead_letters.retry(head) == 3
    await bus.drain()
    assert seen == []
    new_head, *parked = bus.dead_letters.list()
    assert (new_head.event.n, new_head.error_type) == (1, "ValueError")
    assert [(p.event.n, p.parked_behind) for p in parked] == [(2, new_head.id), (3, new_head.id)]


async def test_retrying_the_head_keeps_the_order_when_the_key_was_given_to_publish(
    make_bus: Any,
) -> None:
    # The key comes from publish(key=...), not from the event: the retry must keep it.
    bus = await make_bus(workers=2, ordered=True)
    seen: list[int] = []
    broken = True

    async def ledger(event: Fi4Other) -> None:
        if broken and event.n == 1:
            raise ValueError("poison")
        if event.n == 1:
            await asyncio.sleep(0.01)  # sleep-ok: the head takes a moment: nothing behind it may overtake
        seen.append(event.n)

    bus.subscribe(Fi4Other, ledger, name="ledger", on_dead_letter="park")
    for n in (1, 2, 3):
        await bus.publish(Fi4Other(n), key="K")
    await bus.drain()
    head = bus.dead_letters.list()[0]
    assert [d.parked_behind for d in bus.dead_letters.list()] == [None, head.id, head.id]
    broken = False
    assert await bus.dead_letters.retry(head) == 3
    await bus.drain()
    assert seen == [1, 2, 3]


async def test_discarding_the_head_dispatches_the_parked_events_in_order(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus)
    head = bus.dead_letters.list()[0]
    seen.clear()
    assert bus.dead_letters.discard(head) == 3
    await bus.drain()
    assert seen == [("K", 2), ("K", 3)]  # K1 is dropped, never handled
    assert len(bus.dead_letters) == 0


async def test_events_published_while_parked_join_the_queue_behind_the_head(make_bus: Any) -> None:
    bus, seen, state = await _park_setup(make_bus)
    await bus.publish(Fi4Job(4, "K"))
    await bus.drain()
    assert [(d.event.n, d.error_type) for d in bus.dead_letters.list()] == [
        (1, "ValueError"), (2, "oxbus.Parked"), (3, "oxbus.Parked"), (4, "oxbus.Parked"),
    ]
    seen.clear()
    state["broken"] = False
    assert await bus.dead_letters.retry() == 4  # all: the head and its parked events, once each
    await bus.drain()
    assert seen == [("K", 1), ("K", 2), ("K", 3), ("K", 4)]


async def test_skip_the_default_lets_later_events_of_the_key_proceed(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus, mode="skip")
    assert sorted(seen) == [("K", 2), ("K", 3), ("L", 1), ("L", 2)]
    assert [k for k, _ in seen if k == "K"] == ["K", "K"]
    assert [n for k, n in seen if k == "K"] == [2, 3]  # still in order
    (dl,) = bus.dead_letters.list()
    assert (dl.event.n, dl.error_type, dl.parked_behind) == (1, "ValueError", None)


async def test_skip_is_the_default(make_bus: Any) -> None:
    bus = await make_bus(workers=2, ordered=True)
    seen: list[int] = []

    async def handle(event: Fi4Job) -> None:
        if event.n == 1:
            raise ValueError
        seen.append(event.n)

    bus.subscribe(Fi4Job, handle)
    for n in (1, 2, 3):
        await bus.publish(Fi4Job(n, "K"))
    await bus.drain()
    assert seen == [2, 3]


async def test_parking_is_per_subscription(make_bus: Any) -> None:
    bus = await make_bus(workers=2, ordered=True)
    seen: list[tuple[str, int]] = []

    async def parks(event: Fi4Job) -> None:
        if event.n == 1:
            raise ValueError
        seen.append(("parks", event.n))

    async def audit(event: Fi4Job) -> None:
        seen.append(("audit", event.n))

    bus.subscribe(Fi4Job, parks, on_dead_letter="park", name="parks")
    bus.subscribe(Fi4Job, audit, name="audit")
    for n in (1, 2, 3):
        await bus.publish(Fi4Job(n, "K"))
    await bus.drain()
    assert seen == [("audit", 1), ("audit", 2), ("audit", 3)]
    assert [d.subscription for d in bus.dead_letters.list()] == ["parks"] * 3


async def test_a_parked_key_stays_parked_across_a_durable_restart(tmp_path: Path) -> None:
    path = tmp_path / "park.db"
    seen: list[int] = []
    broken = True

    async def ledger(event: Fi4Job) -> None:
        if broken and event.n == 1:
            raise ValueError("poison")
        seen.append(event.n)

    bus = EventBus(store=path, workers=2, ordered=True)
    bus.subscribe(Fi4Job, ledger, name="ledger", on_dead_letter="park")
    await bus.start()
    for n in (1, 2):
        await bus.publish(Fi4Job(n, "K"))
    await bus.drain(timeout=10)
    await bus.stop()
    assert seen == []

    bus = EventBus(store=path, workers=2, ordered=True)
    bus.subscribe(Fi4Job, ledger, name="ledger", on_dead_letter="park")
    await bus.start()
    try:
        await bus.publish(Fi4Job(3, "K"))
        await bus.drain(timeout=10)
        # K is still parked behind its dead letter: 3 may not overtake 1 and 2.
        assert seen == []
        assert [d.event.n for d in bus.dead_letters.list()] == [1, 2, 3]
        broken = False
        head = bus.dead_letters.list()[0]
        assert await bus.dead_letters.retry(head) == 3
        await bus.drain(timeout=10)
        assert seen == [1, 2, 3]
    finally:
        await bus.stop()


# =============================================================================================
# 4. Timeouts
# =============================================================================================


async def test_an_async_handler_over_its_timeout_is_cancelled_and_counted_failed(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    observed: list[str] = []

    async def slow(event: Fi4Job) -> None:
        try:
            await asyncio.sleep(3600)  # sleep-ok: a handler that hangs
        except asyncio.CancelledError:
            observed.append("cancelled")
            raise
        finally:
            observed.append("finally")

    bus.subscribe(Fi4Job, slow, timeout=0.05, name="slow")
    await bus.publish(Fi4Job(1))
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

    async def slow_then_fast(event: Fi4Job) -> None:
        attempts.append(event.n)
        if len(attempts) < 3:
            await asyncio.sleep(3600)  # sleep-ok: a handler that hangs

    bus.subscribe(Fi4Job, slow_then_fast)
    await bus.publish(Fi4Job(1))
    await bus.drain(timeout=10)
    assert attempts == [1, 1, 1]
    assert len(bus.dead_letters) == 0
    assert bus.get_statistics()["events_failed"] == 2


async def test_a_fast_handler_is_not_affected_by_its_timeout(make_bus: Any) -> None:
    bus = await make_bus(handler_timeout=5.0)
    seen: list[int] = []

    async def quick(event: Fi4Job) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        seen.append(event.n)

    def sync_quick(event: Fi4Job) -> None:
        seen.append(-event.n)

    bus.subscribe(Fi4Job, quick)
    bus.subscribe(Fi4Job, sync_quick)
    for n in range(1, 4):
        await bus.publish(Fi4Job(n))
    await bus.drain()
    assert seen == [1, -1, 2, -2, 3, -3]
    assert bus.get_statistics()["events_failed"] == 0


async def test_hung_thread_pool_handlers_are_abandoned_replaced_and_shown_in_health() -> None:
    release = threading.Event()
    bus = EventBus(workers=2, sync_handlers="thread", thread_pool_size=2, handler_timeout=0.1)
    handled: list[int] = []
    hung_threads: list[str] = []

    def handler(event: Fi4Job) -> None:
        if event.n < 0:
            hung_threads.append(threading.current_thread().name)
            release.wait(60)
            return
        handled.append(event.n)

    bus.subscribe(Fi4Job, handler, name="sync")
    await bus.start()
    try:
        await bus.publish(Fi4Job(-1))
        await bus.publish(Fi4Job(-2))
        for n in range(1, 6):
            await bus.publish(Fi4Job(n))
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


# =============================================================================================
# 5. Circuit breaker
# =============================================================================================


async def test_the_circuit_breaker_pauses_for_the_cool_down_after_n_failures(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[int, float]] = []
    broken = True

    async def flaky(event: Fi4Job) -> None:
        calls.append((event.n, clock.time()))
        if broken:
            raise ConnectionError("downstream down")

    bus.subscribe(Fi4Job, flaky, circuit_breaker=CircuitBreaker(failures=3, cool_down=10.0))
    for n in (1, 2, 3):
        await bus.publish(Fi4Job(n))
    await clock.drain(bus)
    assert calls == [(1, 0.0), (2, 0.0), (3, 0.0)]  # no retries burnt, no pause yet
    broken = False
    await bus.publish(Fi4Job(4))
    await bus.publish(Fi4Job(5))
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

    async def handle(event: Fi4Job) -> None:
        calls.append((event.n, clock.time()))
        if event.n % 3 != 0:
            raise ConnectionError  # fails twice, then one success, repeatedly

    bus.subscribe(Fi4Job, handle, circuit_breaker=CircuitBreaker(failures=3, cool_down=10.0))
    for n in range(1, 10):
        await bus.publish(Fi4Job(n))
    await clock.drain(bus)
    assert [t for _, t in calls] == [0.0] * 9  # never two failures more than the limit
    assert clock.time() == 0.0


async def test_a_failure_while_half_open_opens_the_breaker_again(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[int, float]] = []

    async def handle(event: Fi4Job) -> None:
        calls.append((event.n, clock.time()))
        if event.n <= 3:
            raise ConnectionError

    bus.subscribe(Fi4Job, handle, circuit_breaker=CircuitBreaker(failures=2, cool_down=5.0))
    for n in range(1, 6):
        await bus.publish(Fi4Job(n))
    await clock.drain(bus)
    # 1, 2 fail: open until 5; 3 tried at 5 fails: open until 10; 4 at 10 succeeds; 5 at once.
    assert calls == [(1, 0.0), (2, 0.0), (3, 5.0), (4, 10.0), (5, 10.0)]


async def test_the_breaker_counts_failures_of_its_own_subscription_only(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    calls: list[tuple[str, float]] = []

    async def guarded(event: Fi4Job) -> None:
        calls.append(("guarded", clock.time()))

    async def broken(event: Fi4Job) -> None:
        calls.append(("broken", clock.time()))
        raise ValueError

    bus.subscribe(Fi4Job, guarded, circuit_breaker=CircuitBreaker(failures=1, cool_down=60.0))
    bus.subscribe(Fi4Job, broken)
    for n in range(3):
        await bus.publish(Fi4Job(n))
    await clock.drain(bus)
    assert clock.time() == 0.0
    assert [c for c in calls if c[0] == "guarded"] == [("guarded", 0.0)] * 3


async def test_an_open_breaker_holds_back_retries_instead_of_burning_them(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    times: list[float] = []

    async def flaky(event: Fi4Job) -> None:
        times.append(clock.time())
        if len(times) < 4:
            raise ConnectionError

    bus.subscribe(
        Fi4Job,
        flaky,
        retry=policy(max_attempts=5, base_delay=1.0),
        circuit_breaker=CircuitBreaker(failures=2, cool_down=10.0),
    )
    await bus.publish(Fi4Job(1))
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


# =============================================================================================
# 6. Graceful shutdown
# =============================================================================================


async def test_stop_with_a_timeout_lets_in_flight_handlers_finish() -> None:
    bus = EventBus(workers=2)
    started = asyncio.Event()
    gate = asyncio.Event()
    finished: list[int] = []

    async def slow(event: Fi4Job) -> None:
        started.set()
        await gate.wait()
        finished.append(event.n)

    bus.subscribe(Fi4Job, slow)
    await bus.start()
    await bus.publish(Fi4Job(1))
    await bus.publish(Fi4Job(2))
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

    async def stuck(event: Fi4Job) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            observed.append(f"finally {event.n}")

    bus.subscribe(Fi4Job, stuck)
    await bus.start()
    for n in range(1, 6):
        await bus.publish(Fi4Job(n))
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

    async def blocked(event: Fi4Job) -> None:
        started.set()
        handled.append(event.n)
        await gate.wait()
        finished.append(event.n)

    bus.subscribe(Fi4Job, blocked)
    await bus.start()
    for n in range(10):
        await bus.publish(Fi4Job(n))
    await asyncio.wait_for(started.wait(), 5)
    # The running call may finish within the timeout; the 9 queued events are discarded.
    stopping = asyncio.create_task(bus.stop(drain=False, timeout=10))
    await turns()
    with pytest.raises(BusClosed):
        await bus.publish(Fi4Job(99))  # refused at once, while the running call finishes
    gate.set()
    assert await asyncio.wait_for(stopping, 20) == 9  # the queued ones, not the finished one
    assert handled == [0] and finished == [0]


async def test_stop_without_drain_on_an_idle_bus_discards_nothing() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(Fi4Job, lambda e: seen.append(e.n))
    await bus.start()
    await bus.publish(Fi4Job(1))
    await bus.drain()
    assert await bus.stop(drain=False) == 0
    assert seen == [1]


async def test_a_durable_bus_stopped_without_draining_delivers_the_rest_after_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "stop.db"
    started = asyncio.Event()
    first_run: list[int] = []

    async def slow(event: Fi4Job) -> None:
        first_run.append(event.n)
        started.set()
        await asyncio.Event().wait()

    bus = EventBus(store=path, workers=1)
    bus.subscribe(Fi4Job, slow, name="worker")
    await bus.start()
    for n in range(1, 6):
        await bus.publish(Fi4Job(n, "K"))
    await asyncio.wait_for(started.wait(), 5)
    # Queued events are not handled; the running call gets 0.1 s, then is cancelled.
    await bus.stop(timeout=0.1, drain=False)
    assert first_run == [1]

    second_run: list[int] = []

    async def fast(event: Fi4Job) -> None:
        second_run.append(event.n)

    bus = EventBus(store=path, workers=1)
    bus.subscribe(Fi4Job, fast, name="worker")
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

    async def handle(event: Fi4Job) -> None:
        await gate.wait()
        handled.append(event.n)

    bus.subscribe(Fi4Job, handle)
    await bus.start()
    try:
        for n in (1, 2, 3):  # 1 in the handler, 2 and 3 fill the queue
            await bus.publish(Fi4Job(n))
        waiting = asyncio.create_task(bus.publish(Fi4Job(4)))
        await until(lambda: bus.get_statistics()["blocked_publishers"] == 1, "publish to block")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        gate.set()
        assert await bus.publish(Fi4Job(5)) is True
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

    async def handle(event: Fi4Job) -> None:
        if not gate.is_set():
            await gate.wait()
        handled.append(event.n)

    bus.subscribe(Fi4Job, handle)
    await bus.start()
    try:
        tasks = {n: asyncio.create_task(bus.publish(Fi4Job(n))) for n in range(200)}
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
        await bus.publish_many(Fi4Job(n) for n in range(1000, 1010))
        await bus.drain(timeout=10)
        assert len(handled) == s["events_processed"] + 10
        assert sorted(handled[-10:]) == list(range(1000, 1010))
    finally:
        await bus.stop(timeout=5)
