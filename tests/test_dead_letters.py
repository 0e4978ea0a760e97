"""The dead-letter queue: what a dead letter records, retrying, discarding and purging them,
the replaced bus's get_failed_events(), health, and dead letters across a durable restart."""

from __future__ import annotations

import asyncio
import gc
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from _failures import (
    Job,
    Other,
    Outer,
    PaymentDeclined,
    policy,
    quiet_oxbus_logs,  # noqa: F401 - an autouse fixture
    utc,
)
from oxbus import (
    DeadLetter,
    DomainEvent,
    EventBus,
    ProcessingResult,
    RetryPolicy,
)
from oxbus.testing import ManualClock


async def _dead_letter_of(
    bus: EventBus, clock: ManualClock, exc: BaseException
) -> tuple[Job, DeadLetter]:
    async def handle_payment(event: Job) -> None:
        raise exc

    bus.subscribe(
        Job, handle_payment, name="payments", retry=policy(max_attempts=3, base_delay=1.0)
    )
    event = Job(7, "acct-1")
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
    event, dl = await _dead_letter_of(bus, clock, PaymentDeclined("card 4242 declined"))
    after = datetime.now(timezone.utc)
    assert isinstance(dl, DeadLetter)
    assert isinstance(dl.id, str) and dl.id
    assert dl.event is event and dl.event.event_id == event.event_id
    assert dl.subscription == "payments"
    assert dl.attempts == 3
    assert utc(dl.first_failed_at) and utc(dl.last_failed_at)
    assert before <= dl.first_failed_at <= dl.last_failed_at <= after
    assert dl.error_type == f"{PaymentDeclined.__module__}.PaymentDeclined"
    assert dl.error_message == "card 4242 declined"
    assert isinstance(dl.traceback, str) and "PaymentDeclined" in dl.traceback


async def test_a_dead_letter_traceback_shows_where_the_handler_raised(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)
    _, dl = await _dead_letter_of(bus, clock, PaymentDeclined("declined"))
    assert dl.traceback.startswith("Traceback (most recent call last):"), dl.traceback
    assert "handle_payment" in dl.traceback  # the frame that raised
    assert "raise exc" in dl.traceback  # and its source line


async def test_a_dead_letter_names_builtin_and_nested_error_types(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(clock=clock)

    async def builtin(event: Job) -> None:
        raise KeyError("k")

    async def nested(event: Job) -> None:
        raise Outer.Nested("inner")

    bus.subscribe(Job, builtin, name="builtin")
    bus.subscribe(Job, nested, name="nested")
    await bus.publish(Job(1))
    await clock.drain(bus)
    types = {d.subscription: d.error_type for d in bus.dead_letters.list()}
    assert types == {
        "builtin": "KeyError",
        "nested": f"{Outer.__module__}.Outer.Nested",
    }


async def test_first_failed_at_is_before_last_failed_at_across_real_retries(make_bus: Any) -> None:
    bus = await make_bus(retry=policy(max_attempts=3, base_delay=0.02))

    async def fails(event: Job) -> None:
        raise ValueError

    bus.subscribe(Job, fails)
    await bus.publish(Job(1))
    await bus.drain(timeout=10)
    (dl,) = bus.dead_letters.list()
    assert dl.last_failed_at - dl.first_failed_at >= timedelta(seconds=0.05)


async def test_retrying_one_dead_letter_redispatches_to_its_subscription_only(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    calls: list[tuple[str, int]] = []
    broken = True

    async def ok(event: Job) -> None:
        calls.append(("ok", event.n))

    async def shaky(event: Job) -> None:
        calls.append(("shaky", event.n))
        if broken:
            raise ConnectionError("down")

    bus.subscribe(Job, ok)
    bus.subscribe(Job, shaky, name="shaky")
    await bus.publish(Job(1))
    await bus.publish(Job(2))
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

    bus.subscribe(Job, make("job"), name="job")
    bus.subscribe(Other, make("other"), name="other")
    await bus.publish(Job(1))
    await bus.publish(Other(2))
    await bus.publish(Job(3))
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

    async def fails(event: Job) -> None:
        calls.append(clock.time())
        raise ValueError("still")

    bus.subscribe(Job, fails)
    await bus.publish(Job(1))
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

    async def fails(event: Job) -> None:
        calls.append(event.n)
        raise ValueError

    bus.subscribe(Job, fails)
    await bus.publish(Job(1))
    await bus.publish(Job(2))
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

    async def fails(event: Job) -> None:
        raise ValueError

    bus.subscribe(Job, fails)
    for n in range(5):
        await bus.publish(Job(n))
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

    async def fine(event: Other) -> None:
        pass

    async def fails(event: Job) -> None:
        raise ValueError

    bus.subscribe(Other, fine)
    bus.subscribe(Job, fails)
    # Enough successful calls that the error rate stays far below its threshold.
    await bus.publish_many(Other(i) for i in range(limit * 20))
    await bus.publish_many(Job(i) for i in range(limit - 1))
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "healthy", h["reasons"]
    assert h["dead_letters"] == limit - 1
    await bus.publish(Job(limit))
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

    async def handle(event: Job) -> None:
        if event.n < 0:
            raise ValueError

    bus.subscribe(Job, handle)
    await bus.publish_many(Job(i) for i in range(max(min_calls, 30) - 2))
    await bus.publish_many([Job(-1), Job(-2)])  # 2 of 30: under 10 %
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "healthy", h["reasons"]
    await bus.publish_many([Job(-3), Job(-4)])  # 4 of 32: 12.5 %
    await bus.drain()
    h = bus.get_health_status()
    assert h["status"] == "degraded"
    assert any("failed" in r for r in h["reasons"]), h["reasons"]


async def test_dead_letters_of_a_durable_bus_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    calls: list[int] = []
    broken = True

    async def billing(event: Job) -> None:
        calls.append(event.n)
        if broken:
            raise PaymentDeclined(f"declined {event.n}")

    bus = EventBus(store=path, retry=policy(max_attempts=2, base_delay=0.001))
    bus.subscribe(Job, billing, name="billing")
    await bus.start()
    original = Job(1, "acct-9")
    await bus.publish(original)
    await bus.publish(Job(2, "acct-9"))
    await bus.drain(timeout=10)
    before = [(d.event.n, d.attempts, d.error_type) for d in bus.dead_letters.list()]
    await bus.stop()
    assert calls == [1, 1, 2, 2]
    assert len(before) == 2

    calls.clear()
    bus = EventBus(store=path)
    bus.subscribe(Job, billing, name="billing")
    await bus.start()
    try:
        await bus.drain(timeout=10)
        assert calls == []  # a dead letter is not redelivered by the restart
        entries = bus.dead_letters.list()
        assert [(d.event.n, d.attempts, d.error_type) for d in entries] == before
        first = entries[0]
        assert isinstance(first.event, Job)
        assert first.event.event_id == original.event_id
        assert first.subscription == "billing"
        assert first.error_type == f"{PaymentDeclined.__module__}.PaymentDeclined"
        assert first.error_message == "declined 1"
        assert utc(first.first_failed_at) and first.first_failed_at <= first.last_failed_at
        assert "PaymentDeclined" in first.traceback
        assert len(bus.get_failed_events()) == 2
        broken = False
        assert await bus.dead_letters.retry(first) == 1
        await bus.drain(timeout=10)
        assert calls == [1]
        assert bus.dead_letters.purge() == 1
    finally:
        await bus.stop()

    bus = EventBus(store=path)
    bus.subscribe(Job, billing, name="billing")
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

    async def fails(event: Job) -> None:
        raise ConnectionError("gateway down")

    event = Job(1)
    for run in range(2):
        bus = EventBus(store=path, retry=policy(max_attempts=2, base_delay=0.001))
        bus.subscribe(Job, fails, name="payments")
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


# The replaced bus's failed events: the failing subscription, first and last failure times.


class FailEvent(DomainEvent):
    def __init__(self, n: int, fail_times: int) -> None:
        super().__init__()
        self.n = n
        self.fail_times = fail_times


class FailOther(DomainEvent):
    pass


async def test_failed_event_names_the_subscription_that_failed(make_bus: Any) -> None:
    bus = await make_bus()

    async def fine(event: FailEvent) -> None:
        pass

    async def broken(event: FailEvent) -> None:
        raise ValueError("nope")

    bus.subscribe(FailEvent, fine, name="fine")
    bus.subscribe(FailEvent, broken, name="broken")
    await bus.publish(FailEvent(1, 99))
    await bus.drain()
    (entry,) = bus.get_failed_events()
    assert entry["subscription"].name == "broken"
    assert entry["final_result"].subscription == "broken"
    (dl,) = bus.dead_letters.list()
    assert dl.subscription == "broken"
    assert dl.attempts == 1
    assert dl.error_type == "ValueError"
    assert dl.error_message == "nope"


async def test_dead_letter_retry_goes_to_the_failed_subscription_even_when_names_repeat(
    make_bus: Any,
) -> None:
    # Default subscription names are qualified names; handlers made by one factory share
    # one, and DESIGN.md says duplicate names are fine in memory.
    bus = await make_bus()
    calls: list[str] = []

    def make(tag: str, fails: bool) -> Any:
        async def handle(event: Any) -> None:
            calls.append(tag)
            if fails:
                raise ValueError(tag)

        return handle

    bus.subscribe(FailOther, make("other-ok", False))
    bus.subscribe(FailEvent, make("event-fails", True))
    await bus.publish(FailEvent(1, 99))
    await bus.drain()
    assert calls == ["event-fails"]
    calls.clear()
    assert await bus.dead_letters.retry() == 1
    await bus.drain()
    assert calls == ["event-fails"]  # retried alone, on the subscription that failed


async def test_first_failed_at_is_never_before_the_event_existed(make_bus: Any) -> None:
    bus = await make_bus(retry=RetryPolicy(base_delay=0.0005, max_delay=0.001, jitter=0.0))
    attempts: dict[int, int] = {}

    async def handler(event: FailEvent) -> None:
        attempts[event.n] = attempts.get(event.n, 0) + 1
        if attempts[event.n] <= event.fail_times:
            raise ValueError(f"attempt {attempts[event.n]}")

    bus.subscribe(FailEvent, handler, retry_count=1, name="h")
    # Events that fail once and then succeed on their retry; each is freed afterwards.
    for i in range(200):
        await bus.publish(FailEvent(i, 1))
        await bus.drain()
    assert bus.get_failed_events() == []
    gc.collect()
    before = datetime.now(timezone.utc)
    # New events (often at the addresses of the freed ones) that fail for good.
    for j in range(200):
        await bus.publish(FailEvent(1000 + j, 99))
        await bus.drain()
    letters = bus.dead_letters.list()
    assert len(letters) == 200
    too_early = [d for d in letters if d.first_failed_at < before]
    assert too_early == [], (
        f"{len(too_early)} dead letters claim a first failure before their event was published"
    )
    for d in letters:
        assert d.attempts == 2
        assert d.first_failed_at <= d.last_failed_at


async def test_a_handler_failing_on_a_retry_then_succeeding_leaves_no_failed_event(
    make_bus: Any,
) -> None:
    bus = await make_bus(retry=RetryPolicy(base_delay=0.001, jitter=0.0))
    attempts = 0

    async def flaky(event: FailEvent) -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        if attempts < 3:
            raise TimeoutError("flaky")

    bus.subscribe(FailEvent, flaky, retry_count=2)
    await bus.publish(FailEvent(1, 0))
    await bus.drain()
    assert attempts == 3
    assert bus.get_failed_events() == []
    stats = bus.get_statistics()
    assert stats["events_failed"] == 2
    assert stats["failed_events_count"] == 0


def test_a_broker_dead_letter_that_cannot_be_rebuilt_is_listed_as_it_is() -> None:
    """What another system (or the broker) dead-lettered may not fit: it is still listed."""
    from oxbus.dead_letters import _from_broker
    from oxbus.errors import SerializationError

    def refuse(body: object) -> object:
        raise SerializationError("cannot rebuild X.amount from 'abc'")

    body = {"event_type": "X", "data": {"amount": "abc"}}
    entry = _from_broker(
        ("dl-1", "orders", json.dumps(body), {"attempts": "many", "error_type": "rabbitmq.rejected"}),
        refuse,
    )
    assert (entry.id, entry.event, entry.attempts, entry.error_type) == (
        "dl-1", body, 0, "rabbitmq.rejected"
    )
    entry = _from_broker(("dl-2", "orders", "not json", {}), refuse)
    assert (entry.event, entry.error_type) == ("not json", "oxbus.Refused")
