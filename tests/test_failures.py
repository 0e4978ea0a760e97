"""Failures as the replaced bus reported them: ``get_failed_events()`` is the dead-letter queue,
each entry naming the failing subscription and when it first and last failed."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import datetime, timezone
from typing import Any

import pytest

from oxbus import DomainEvent, RetryPolicy


class FailEvent(DomainEvent):
    def __init__(self, n: int, fail_times: int) -> None:
        super().__init__()
        self.n = n
        self.fail_times = fail_times


class FailOther(DomainEvent):
    pass


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")


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
