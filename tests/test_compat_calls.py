"""Calls the replaced bus's callers make, exactly as they make them (issue 11, drop-in gaps)."""

from __future__ import annotations

from typing import Any

from oxbus import EventBus, InMemoryEventBus, RetryPolicy, Subscription


class Booked:
    def __init__(self, n: int) -> None:
        self.n = n


async def test_subscribe_takes_is_async_priority_and_retry_count_by_position(
    make_bus: Any,
) -> None:
    bus = await make_bus(cls=InMemoryEventBus, retry=RetryPolicy(base_delay=0.001, jitter=0))
    order: list[str] = []
    calls = 0

    async def flaky(event: Booked) -> None:
        nonlocal calls
        calls += 1
        order.append("flaky")
        if calls < 4:
            raise ConnectionError("down")

    async def urgent(event: Booked) -> None:
        order.append("urgent")

    bus.subscribe(Booked, flaky, True, 5, 3)  # is_async, priority, retry_count
    bus.subscribe(Booked, urgent, True, 1)
    await bus.publish(Booked(1))
    await bus.drain()
    assert order == ["urgent", "flaky", "flaky", "flaky", "flaky"]  # 1 before 5; 3 retries
    assert bus.get_failed_events() == []
    assert bus.get_statistics()["retried"] == 3


async def test_unsubscribe_of_an_id_it_does_not_know_returns_false(make_bus: Any) -> None:
    bus = await make_bus()
    sid = bus.subscribe(Booked, lambda e: None)
    assert bus.unsubscribe("no-such-id") is False
    assert bus.unsubscribe("sub-999999") is False
    assert bus.unsubscribe("sub-x") is False
    assert bus.unsubscribe(sid) is True
    assert bus.unsubscribe(sid) is False


async def test_failed_events_carry_the_subscription_object(make_bus: Any) -> None:
    bus = await make_bus()

    def broken(event: Booked) -> None:
        raise ValueError(f"bad {event.n}")

    sid = bus.subscribe(Booked, broken, False, 7, 0)
    await bus.publish(Booked(1))
    await bus.drain()
    (failed,) = bus.get_failed_events()
    sub = failed["subscription"]
    assert isinstance(sub, Subscription)
    assert sub.handler is broken
    assert sub.event_type is Booked
    assert (sub.priority, sub.is_async, sub.retry_count) == (7, False, 0)
    assert sub.subscription_id == sid
    assert sub.name == broken.__module__ + "." + broken.__qualname__
    assert failed["final_result"].success is False
    assert failed["event"].n == 1


async def test_statistics_carry_both_spellings_of_the_counters(make_bus: Any) -> None:
    bus = await make_bus(cls=EventBus)

    def half(event: Booked) -> None:
        if event.n % 2:
            raise ValueError("odd")

    bus.subscribe(Booked, half, retry_count=1)
    for n in range(4):
        await bus.publish(Booked(n))
    await bus.drain()
    s = bus.get_statistics()
    assert (s["published"], s["events_published"]) == (4, 4)
    assert (s["processed"], s["events_processed"]) == (4, 4)
    assert (s["failed"], s["events_failed"]) == (4, 4)  # 2 odd events x 2 attempts
    assert s["retried"] == 2
    assert s["dead_lettered"] == 2
