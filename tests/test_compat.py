"""The names of the bus being replaced (seed 000 and seed 003) work unchanged (DESIGN.md,
"Compat names")."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from _cpu import TOLERANCE, Window, burn

import oxbus
from oxbus import (
    BusNotStarted,
    DomainEvent,
    EventBus,
    EventBusFactory,
    EventBusManager,
    InMemoryEventBus,
    ProcessingResult,
    RetryPolicy,
)

STATISTICS_KEYS = {
    "uptime_seconds",
    "events_published",
    "events_processed",
    "events_failed",
    "avg_processing_time_ms",
    "queue_size",
    "retry_queue_size",
    "failed_events_count",
    "subscription_count",
    "is_running",
    "worker_count",
}


class OrderPlaced(DomainEvent):
    def __init__(self, order_id: str, amount: float = 1.0) -> None:
        super().__init__()
        self.order_id = order_id
        self.amount = amount

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class Ping(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


def test_public_names_are_exported() -> None:
    for name in (
        "DomainEvent",
        "EventBus",
        "InMemoryEventBus",
        "EventBusFactory",
        "EventBusManager",
        "RetryPolicy",
        "ConcurrencyError",
        "ProcessingResult",
        "current_envelope",
    ):
        assert hasattr(oxbus, name), name
    from oxbus import errors

    for name in (
        "OxbusError",
        "BusNotStarted",
        "BusClosed",
        "QueueFull",
        "ConcurrencyError",
        "SerializationError",
        "StorageError",
        "TransportError",
    ):
        assert issubclass(getattr(errors, name), errors.OxbusError), name


async def test_factory_creates_an_in_memory_bus_with_the_given_worker_count() -> None:
    bus = EventBusFactory.create_in_memory_event_bus(worker_count=2)
    assert isinstance(bus, InMemoryEventBus)
    assert isinstance(bus, EventBus)
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        seen.append(event.n)

    bus.subscribe(Ping, handler)
    await bus.start()
    try:
        assert bus.get_statistics()["worker_count"] == 2
        await bus.publish(Ping(1))
        await bus.drain()
        assert seen == [1]
    finally:
        await bus.stop()


async def test_constructor_accepts_every_compat_keyword(make_bus: Any) -> None:
    class Storage:
        async def store_event(self, event: Any) -> None:
            pass

        async def mark_event_processed(self, event_id: Any, result: Any) -> None:
            pass

    bus = await make_bus(
        cls=InMemoryEventBus,
        event_storage=Storage(),
        max_queue_size=500,
        worker_count=3,
        batch_size=100,
        batch_timeout_seconds=5.0,
    )
    stats = bus.get_statistics()
    assert stats["worker_count"] == 3
    assert bus.get_health_status()["worker_count"] == 3


async def test_batch_settings_never_delay_dispatch_into_an_idle_bus(make_bus: Any) -> None:
    # A 30 s batch window must not hold back an event published into an idle bus.
    bus = await make_bus(cls=InMemoryEventBus, batch_size=1000, batch_timeout_seconds=30.0)
    handled = asyncio.get_running_loop().create_future()

    async def handler(event: Ping) -> None:
        handled.set_result(event.n)

    bus.subscribe(Ping, handler)
    await bus.publish(Ping(7))
    assert await asyncio.wait_for(handled, timeout=2.0) == 7


def test_bus_can_be_constructed_and_subscribed_outside_a_running_loop() -> None:
    bus = InMemoryEventBus(worker_count=2, max_queue_size=10)
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        seen.append(event.n)

    sid = bus.subscribe(Ping, handler)
    assert isinstance(sid, str)

    async def main() -> None:
        async with bus:
            await bus.publish(Ping(1))
            await bus.publish(Ping(2))
            await bus.drain()

    asyncio.run(main())
    assert sorted(seen) == [1, 2]


async def test_subscribe_returns_a_str_id_synchronously(make_bus: Any) -> None:
    bus = await make_bus()

    async def handler(event: Any) -> None:
        pass

    sid = bus.subscribe(Ping, handler, is_async=True, priority=1, retry_count=3)
    assert isinstance(sid, str) and sid
    assert not inspect.isawaitable(sid)
    other = bus.subscribe(Ping, handler)
    assert other != sid
    assert bus.get_statistics()["subscription_count"] == 2


async def test_unsubscribe_by_id_returns_true_once_and_stops_delivery(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        seen.append(event.n)

    sid = bus.subscribe(Ping, handler)
    await bus.publish(Ping(1))
    await bus.drain()
    assert bus.unsubscribe(sid) is True
    assert bus.unsubscribe(sid) is False
    await bus.publish(Ping(2))
    await bus.drain()
    assert seen == [1]
    assert bus.get_statistics()["subscription_count"] == 0


async def test_unsubscribe_by_event_class_and_handler_stops_only_that_handler(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    seen: list[tuple[str, int]] = []

    async def first(event: Ping) -> None:
        seen.append(("first", event.n))

    async def second(event: Ping) -> None:
        seen.append(("second", event.n))

    bus.subscribe(Ping, first)
    bus.subscribe(Ping, second)
    assert bus.unsubscribe(Ping, first) is True
    assert bus.unsubscribe(Ping, first) is False
    await bus.publish(Ping(1))
    await bus.drain()
    assert seen == [("second", 1)]


async def test_unsubscribe_by_class_and_bound_method_works(make_bus: Any) -> None:
    bus = await make_bus()

    class Service:
        def __init__(self) -> None:
            self.seen: list[int] = []

        async def on_ping(self, event: Ping) -> None:
            self.seen.append(event.n)

    svc = Service()
    bus.subscribe(Ping, svc.on_ping)
    await bus.publish(Ping(1))
    await bus.drain()
    assert bus.unsubscribe(Ping, svc.on_ping) is True
    await bus.publish(Ping(2))
    await bus.drain()
    assert svc.seen == [1]


async def test_publish_is_a_coroutine_function_returning_true(make_bus: Any) -> None:
    bus = await make_bus()
    assert inspect.iscoroutinefunction(EventBus.publish)
    coro = bus.publish(Ping(1))
    assert asyncio.iscoroutine(coro)
    assert await coro is True


async def test_publish_works_with_create_task_and_gather(make_bus: Any) -> None:
    bus = await make_bus(worker_count=2)
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        seen.append(event.n)

    bus.subscribe(Ping, handler)
    task = asyncio.create_task(bus.publish(Ping(0)))
    assert await task is True
    results = await asyncio.gather(*(bus.publish(Ping(i)) for i in range(1, 51)))
    assert results == [True] * 50
    await bus.drain()
    assert sorted(seen) == list(range(51))


async def test_publish_before_start_raises_bus_not_started_a_runtime_error() -> None:
    bus = InMemoryEventBus(worker_count=1)
    assert issubclass(BusNotStarted, RuntimeError)
    with pytest.raises(BusNotStarted):
        await bus.publish(Ping(1))
    with pytest.raises(RuntimeError):
        await bus.publish(Ping(1))
    with pytest.raises(BusNotStarted):
        bus.publish_nowait(Ping(1))
    with pytest.raises(BusNotStarted):
        await bus.publish_batch([Ping(1)])
    assert bus.get_statistics()["events_published"] == 0


async def test_publish_batch_publishes_every_event_in_order_and_returns_none(
    make_bus: Any,
) -> None:
    bus = await make_bus(cls=InMemoryEventBus, worker_count=4)
    seen: list[int] = []

    async def handler(event: OrderPlaced) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        seen.append(int(event.amount))

    bus.subscribe(OrderPlaced, handler)
    result = await bus.publish_batch([OrderPlaced("o-1", i) for i in range(100)])
    assert result is None
    await bus.drain()
    assert seen == list(range(100))  # one aggregate: publish order
    assert bus.get_statistics()["events_published"] == 100


async def test_publish_batch_accepts_a_generator(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        seen.append(event.n)

    bus.subscribe(Ping, handler)
    await bus.publish_batch(Ping(i) for i in range(10))
    await bus.drain()
    assert seen == list(range(10))


async def test_get_statistics_has_the_design_keys_and_worker_count_right_after_start() -> None:
    bus = EventBusFactory.create_in_memory_event_bus(worker_count=2)
    assert STATISTICS_KEYS <= set(bus.get_statistics())
    await bus.start()
    try:
        stats = bus.get_statistics()  # no sleep: seed 000 problem #3
        assert STATISTICS_KEYS <= set(stats)
        assert stats["worker_count"] == 2
        assert stats["is_running"] is True
        assert stats["events_published"] == 0
        assert stats["queue_size"] == 0
        assert stats["uptime_seconds"] >= 0
    finally:
        await bus.stop()
    assert bus.get_statistics()["is_running"] is False


async def test_get_statistics_counts_published_processed_and_failed(make_bus: Any) -> None:
    bus = await make_bus(worker_count=2)
    took: list[float] = []

    async def known_time() -> None:
        # Every call suspends, so the bus times every one (README, "Statistics and health").
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)  # sleep-ok: a handler that takes a known time
        took.append(time.perf_counter() - t0)

    async def ok(event: Ping) -> None:
        await known_time()

    async def boom(event: Ping) -> None:
        await known_time()
        if event.n % 2:
            raise ValueError(f"odd {event.n}")

    bus.subscribe(Ping, ok)
    bus.subscribe(Ping, boom)
    for i in range(10):
        await bus.publish(Ping(i))
    await bus.drain()
    stats = bus.get_statistics()
    assert stats["events_published"] == 10
    assert stats["events_processed"] == 10
    assert stats["events_failed"] == 5
    assert stats["failed_events_count"] == 5
    assert stats["subscription_count"] == 2
    assert stats["queue_size"] == 0
    assert stats["retry_queue_size"] == 0
    # The mean of the 20 calls as the handlers timed themselves; the bus times from the call
    # (or its first suspension, a few us later) to its end, so it may add only its overhead.
    assert len(took) == 20
    mine = 1000 * sum(took) / len(took)
    assert mine * 0.97 - 0.05 <= stats["avg_processing_time_ms"] <= mine * 1.05 + 1.0, mine


async def test_get_failed_events_lists_final_failures_and_clear_empties_it(
    make_bus: Any,
) -> None:
    bus = await make_bus()

    async def fails(event: Ping) -> None:
        raise KeyError(f"missing {event.n}")

    bus.subscribe(Ping, fails, name="billing.fails")
    event = Ping(3)
    before = datetime.now(timezone.utc)
    await bus.publish(event)
    await bus.drain()
    failed = bus.get_failed_events()
    assert len(failed) == 1
    entry = failed[0]
    assert {"event", "subscription", "final_result", "failed_at"} <= set(entry)
    assert entry["event"] is event
    assert entry["subscription"].name == "billing.fails"
    result = entry["final_result"]
    assert isinstance(result, ProcessingResult)
    assert result.success is False
    assert result.event_id == event.event_id
    assert "missing 3" in (result.error_message or "")
    assert isinstance(entry["failed_at"], datetime)
    assert entry["failed_at"].utcoffset() == timedelta(0)
    assert entry["failed_at"] >= before - timedelta(seconds=1)
    assert bus.get_statistics()["failed_events_count"] == 1
    assert bus.clear_failed_events() is None
    assert bus.get_failed_events() == []
    assert bus.get_statistics()["failed_events_count"] == 0


async def test_retry_count_retries_a_failing_handler_until_it_succeeds(make_bus: Any) -> None:
    bus = await make_bus(retry=RetryPolicy(base_delay=0.001, max_delay=0.01, jitter=0.0))
    calls: list[int] = []

    async def flaky(event: Ping) -> None:
        calls.append(event.n)
        if len(calls) < 3:
            raise ConnectionError("try again")

    bus.subscribe(Ping, flaky, is_async=True, priority=1, retry_count=3)
    await bus.publish(Ping(1))
    await bus.drain()  # waits for scheduled retries too
    assert calls == [1, 1, 1]
    stats = bus.get_statistics()
    assert stats["events_failed"] == 2
    assert stats["events_processed"] == 1
    assert bus.get_failed_events() == []


async def test_get_health_status_reports_status_queue_workers_and_memory(
    make_bus: Any,
) -> None:
    with Window() as since_start:  # this process's own CPU clock, from just before start()
        bus = await make_bus(worker_count=3)
        health = bus.get_health_status()
        assert {"status", "queue_size", "worker_count", "memory_usage_mb", "cpu_percent"} <= set(
            health
        )
        assert health["status"] == "healthy"
        assert health["queue_size"] == 0
        assert health["worker_count"] == 3
        assert isinstance(health["memory_usage_mb"], (int, float))
        assert health["memory_usage_mb"] > 1.0

        # cpu_percent: this process's CPU, percent of one core, over a fixed window (10 s at
        # least; since start() while the bus is younger): an idle interval, then a handler
        # burning 0.5 s of CPU, then two reports in a row.
        def spin(event: Ping) -> None:
            burn(0.5)

        bus.subscribe(Ping, spin)
        await asyncio.sleep(0.3)  # sleep-ok: an idle interval to measure CPU over
        await bus.publish(Ping(1))
        await bus.drain()
        first = bus.get_health_status()
        second = bus.get_health_status()
    assert first["cpu_percent"] == pytest.approx(since_start.percent, abs=TOLERANCE)
    assert first["cpu_window_seconds"] == pytest.approx(since_start.wall, abs=0.2)
    # The second report is not over the millisecond since the first: the same window.
    assert second["cpu_window_seconds"] >= first["cpu_window_seconds"]
    assert second["cpu_percent"] == pytest.approx(first["cpu_percent"], abs=5.0)
    await bus.stop()
    assert bus.get_health_status()["status"] == "stopped"


async def test_get_stats_reports_published_received_processed_failed(make_bus: Any) -> None:
    bus = await make_bus()

    def sync_handler(event: Ping) -> None:
        if event.n == 2:
            raise RuntimeError("two")

    bus.subscribe(Ping, sync_handler)
    for i in range(4):
        await bus.publish(Ping(i))
    await bus.drain()
    stats = bus.get_stats()
    assert stats["published"] == 4
    assert stats["received"] == 4
    assert stats["processed"] == 4
    assert stats["failed"] == 1


async def test_event_bus_manager_starts_and_stops_the_bus_draining_on_exit() -> None:
    bus = InMemoryEventBus(worker_count=2)
    seen: list[int] = []

    async def handler(event: Ping) -> None:
        for _ in range(3):
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        seen.append(event.n)

    bus.subscribe(Ping, handler)
    async with EventBusManager(bus) as started:
        assert started is bus
        assert bus.is_running
        for i in range(20):
            await started.publish(Ping(i))
    assert not bus.is_running
    assert sorted(seen) == list(range(20))


class RecordingStorage:
    """The storage protocol of the bus being replaced."""

    def __init__(self, log: list[Any]) -> None:
        self.log = log
        self.stored: list[Any] = []
        self.marked: list[tuple[Any, ProcessingResult]] = []

    async def store_event(self, event: Any) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, as a database write would have
        self.stored.append(event)
        self.log.append(("store", event.n))

    async def mark_event_processed(self, event_id: Any, result: ProcessingResult) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        self.marked.append((event_id, result))
        self.log.append(("mark", result.subscription, event_id))


async def test_event_storage_store_event_is_awaited_before_publish_returns(
    make_bus: Any,
) -> None:
    log: list[Any] = []
    storage = RecordingStorage(log)
    bus = await make_bus(cls=InMemoryEventBus, event_storage=storage, worker_count=2)

    async def handler(event: Ping) -> None:
        log.append(("handle", event.n))

    bus.subscribe(Ping, handler)
    event = Ping(1)
    assert await bus.publish(event) is True
    assert storage.stored == [event]
    await bus.drain()
    assert log.index(("store", 1)) < log.index(("handle", 1))


async def test_event_storage_is_marked_once_per_handler_call_after_the_call(
    make_bus: Any,
) -> None:
    log: list[Any] = []
    storage = RecordingStorage(log)
    bus = await make_bus(cls=InMemoryEventBus, event_storage=storage, worker_count=2)

    async def good(event: Ping) -> None:
        log.append(("handle", "good", event.event_id))

    async def bad(event: Ping) -> None:
        log.append(("handle", "bad", event.event_id))
        raise ValueError(f"bad {event.n}")

    bus.subscribe(Ping, good, name="good")
    bus.subscribe(Ping, bad, name="bad", priority=2)
    events = [Ping(i) for i in range(3)]
    for e in events:
        await bus.publish(e)
    await bus.drain()

    assert len(storage.marked) == 6
    for e in events:
        results = {r.subscription: (eid, r) for eid, r in storage.marked if eid == e.event_id}
        assert set(results) == {"good", "bad"}
        _, ok = results["good"]
        _, ko = results["bad"]
        assert isinstance(ok, ProcessingResult) and isinstance(ko, ProcessingResult)
        assert ok.event_id == e.event_id and ok.success is True and ok.error_message is None
        assert ko.success is False and f"bad {e.n}" in (ko.error_message or "")
        assert ok.processing_time_ms >= 0 and ok.retry_attempt == 0
        for name in ("good", "bad"):
            handled = log.index(("handle", name, e.event_id))
            marked = log.index(("mark", name, e.event_id))
            assert handled < marked


async def test_event_storage_with_a_sync_mark_method_is_called_too(make_bus: Any) -> None:
    marked: list[tuple[Any, ProcessingResult]] = []

    class SyncMarkStorage:
        async def store_event(self, event: Any) -> None:
            pass

        def mark_event_processed(self, event_id: Any, result: ProcessingResult) -> None:
            marked.append((event_id, result))

    bus = await make_bus(cls=InMemoryEventBus, event_storage=SyncMarkStorage())

    async def handler(event: Ping) -> None:
        pass

    bus.subscribe(Ping, handler)
    e = Ping(1)
    await bus.publish(e)
    await bus.drain()
    assert [(eid, r.success) for eid, r in marked] == [(e.event_id, True)]


def test_processing_result_has_the_replaced_bus_fields_in_order() -> None:
    names = [f.name for f in dataclasses.fields(ProcessingResult)]
    assert names[:5] == [
        "event_id",
        "success",
        "error_message",
        "processing_time_ms",
        "retry_attempt",
    ]
    assert "subscription" in names


async def test_publish_before_start_raises_without_storing_the_event() -> None:
    # A refused event must not reach event_storage: a log would then hold an event the bus
    # never accepted nor dispatched.
    storage = RecordingStorage([])
    bus = InMemoryEventBus(event_storage=storage)
    with pytest.raises(BusNotStarted):
        await bus.publish(Ping(1))
    assert storage.stored == []


async def test_subclass_overriding_init_configures_the_bus_with_its_keywords(
    make_bus: Any,
) -> None:
    class ThreeWorkerBus(InMemoryEventBus):
        def __init__(self, **kwargs: Any) -> None:
            kwargs["worker_count"] = 3
            super().__init__(**kwargs)

    bus = await make_bus(cls=ThreeWorkerBus)
    assert bus.get_statistics()["worker_count"] == 3
