"""Migrating from the pure-Python ``InMemoryEventBus`` to oxbus: one import changes.

The first half of this file is a small, faithful version of the bus being replaced: an
``asyncio.Queue``, ``worker_count`` worker tasks, a dict of subscriptions per event type kept sorted
by priority (1 = most urgent), retries, statistics, a health report with an optional psutil,
``EventBusFactory`` and ``EventBusManager``. The second half is application code — the domain events
(on the application's own ``DomainEvent`` base, which imports no bus), its handlers and a test-like
scenario — written once against ``bus_module``.

It runs the same application twice with 4 workers:

* before: ``bus_module = legacy_event_bus``; the test waits with ``await asyncio.sleep(0.1)``,
  and an order's events are handled out of order;
* after: ``bus_module = oxbus``; the test waits with ``await bus.drain()``, and each order's
  events are handled in publish order (per ``aggregate_id``) while different orders still run
  concurrently.

Run: .venv/bin/python examples/migration_before_after.py
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import types
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Dict, List, Optional

import oxbus

# =============================================================================================
# BEFORE: a pure-Python bus (an infrastructure/events/event_bus.py), kept small
# =============================================================================================

_legacy_logger = logging.getLogger("legacy_event_bus")

psutil: Any = None
try:  # psutil is optional, with a graceful fallback
    psutil = importlib.import_module("psutil")
    PERFORMANCE_MONITORING_AVAILABLE = True
except ImportError:
    PERFORMANCE_MONITORING_AVAILABLE = False


@dataclass
class EventSubscription:
    event_type: str
    handler: Callable[[Any], Any]
    is_async: bool = True
    priority: int = 1  # 1 is the most urgent
    retry_count: int = 3
    subscription_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass
class EventProcessingResult:
    event_id: str
    success: bool
    error_message: Optional[str] = None
    processing_time_ms: float = 0.0
    retry_attempt: int = 0


class LegacyInMemoryEventBus:
    """``asyncio.Queue`` + worker tasks + ``{event type: [subscriptions by priority]}``."""

    def __init__(self, event_storage: Any = None, max_queue_size: int = 10_000,
                 worker_count: int = 1, batch_size: int = 10,
                 batch_timeout_seconds: float = 1.0) -> None:
        self._event_storage = event_storage
        self._max_queue_size = max_queue_size
        self._worker_count = worker_count
        self._batch_size = batch_size  # accepted, as in the original, and not used here
        self._batch_timeout_seconds = batch_timeout_seconds
        self._event_queue: Optional[asyncio.Queue[Any]] = None
        self._subscriptions: Dict[str, List[EventSubscription]] = {}
        self._workers: List[asyncio.Task[None]] = []
        self._is_running = False
        self._start_time: Optional[float] = None
        self._events_published = 0
        self._events_processed = 0
        self._events_failed = 0
        self._total_processing_time_ms = 0.0
        self._failed_events: List[Dict[str, Any]] = []
        self._logger = _legacy_logger

    # -- subscriptions ----------------------------------------------------------------------
    def subscribe(self, event_type: Any, handler: Callable[[Any], Any], is_async: bool = True,
                  priority: int = 1, retry_count: int = 3) -> str:
        name = event_type if isinstance(event_type, str) else event_type.__name__
        sub = EventSubscription(name, handler, is_async, priority, retry_count)
        subs = self._subscriptions.setdefault(name, [])
        subs.append(sub)
        subs.sort(key=lambda s: s.priority)  # stable: ties keep subscription order
        return sub.subscription_id

    def unsubscribe(self, subscription_id: str) -> bool:
        for subs in self._subscriptions.values():
            for i, s in enumerate(subs):
                if s.subscription_id == subscription_id:
                    del subs[i]
                    return True
        return False

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._is_running:
            return
        self._event_queue = asyncio.Queue(maxsize=self._max_queue_size)
        self._is_running = True
        self._start_time = time.time()
        for i in range(self._worker_count):
            self._workers.append(asyncio.create_task(self._worker(i)))
        await asyncio.sleep(0.01)  # "wait until every worker has started"

    async def stop(self) -> None:
        if not self._is_running:
            return
        self._is_running = False
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    # -- publishing -------------------------------------------------------------------------
    async def publish(self, event: Any) -> bool:
        if not self._is_running or self._event_queue is None:
            raise RuntimeError("event bus is not running")
        if self._event_storage is not None:
            await self._event_storage.store_event(event)
        await self._event_queue.put(event)
        self._events_published += 1
        return True

    async def publish_batch(self, events: List[Any]) -> None:
        for event in events:
            await self.publish(event)

    # -- processing (blocks on queue.get(), no polling) -------------------------------------
    async def _worker(self, worker_id: int) -> None:
        queue = self._event_queue
        assert queue is not None
        while self._is_running:
            event = await queue.get()
            try:
                await self._process_event(event)
            except Exception as e:  # a worker never dies
                self._logger.error("Worker %d error: %s", worker_id, e)
            finally:
                queue.task_done()

    async def _process_event(self, event: Any) -> None:
        started = time.perf_counter()
        for sub in list(self._subscriptions.get(event.event_type, ())):
            await self._execute_handler(sub, event)
        self._total_processing_time_ms += (time.perf_counter() - started) * 1000
        self._events_processed += 1

    async def _execute_handler(self, sub: EventSubscription, event: Any) -> None:
        for attempt in range(sub.retry_count + 1):
            started = time.perf_counter()
            try:
                if sub.is_async:
                    await sub.handler(event)
                else:
                    sub.handler(event)
                result = EventProcessingResult(event.event_id, True, None,
                                               (time.perf_counter() - started) * 1000, attempt)
                if self._event_storage is not None:
                    await self._event_storage.mark_event_processed(event.event_id, result)
                return
            except Exception as e:
                self._events_failed += 1
                self._logger.warning("handler failed (attempt %d): %s", attempt + 1, e)
                last = EventProcessingResult(event.event_id, False, str(e),
                                             (time.perf_counter() - started) * 1000, attempt)
        self._failed_events.append({"event": event, "final_result": last,
                                    "failed_at": datetime.now(timezone.utc)})

    # -- statistics -------------------------------------------------------------------------
    def get_statistics(self) -> Dict[str, Any]:
        processed = self._events_processed
        return {
            "uptime_seconds": time.time() - self._start_time if self._start_time else 0.0,
            "events_published": self._events_published,
            "events_processed": processed,
            "events_failed": self._events_failed,
            "avg_processing_time_ms": self._total_processing_time_ms / processed if processed else 0.0,
            "queue_size": self._event_queue.qsize() if self._event_queue else 0,
            "retry_queue_size": 0,
            "failed_events_count": len(self._failed_events),
            "subscription_count": sum(len(s) for s in self._subscriptions.values()),
            "is_running": self._is_running,
            "worker_count": len(self._workers),
        }

    def get_health_status(self) -> Dict[str, Any]:
        memory = 0.0
        if PERFORMANCE_MONITORING_AVAILABLE:
            memory = psutil.Process().memory_info().rss / 1024 / 1024
        return {
            "status": "healthy" if self._is_running else "stopped",
            "queue_size": self._event_queue.qsize() if self._event_queue else 0,
            "worker_count": len(self._workers),
            "memory_usage_mb": memory,
        }

    def get_failed_events(self) -> List[Dict[str, Any]]:
        return list(self._failed_events)

    def clear_failed_events(self) -> None:
        self._failed_events.clear()


class LegacyEventBusFactory:
    @staticmethod
    def create_in_memory_event_bus(worker_count: int = 1, **kwargs: Any) -> LegacyInMemoryEventBus:
        return LegacyInMemoryEventBus(worker_count=worker_count, **kwargs)


class LegacyEventBusManager:
    def __init__(self, event_bus: LegacyInMemoryEventBus) -> None:
        self.event_bus = event_bus

    async def __aenter__(self) -> LegacyInMemoryEventBus:
        await self.event_bus.start()
        return self.event_bus

    async def __aexit__(self, *exc: object) -> None:
        await self.event_bus.stop()


# What `from upbit_auto_trading.infrastructure.events.event_bus import ...` used to give.
legacy_event_bus = types.SimpleNamespace(
    InMemoryEventBus=LegacyInMemoryEventBus,
    EventBusFactory=LegacyEventBusFactory,
    EventBusManager=LegacyEventBusManager,
)


# =============================================================================================
# The application: domain events, handlers and a test-like scenario, written once
# =============================================================================================


class DomainEvent:
    """The application's own base class (domain layer): it imports no event bus."""

    def __init__(self) -> None:
        self.event_id = str(uuid.uuid4())
        self.occurred_at = datetime.now(timezone.utc)

    @property
    def event_type(self) -> str:
        return type(self).__name__

    @property
    def aggregate_id(self) -> str:
        raise NotImplementedError


class OrderEvent(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id

    @property
    def aggregate_id(self) -> str:  # oxbus orders events per aggregate_id
        return self.order_id


class OrderCreated(OrderEvent):
    pass


class OrderPaid(OrderEvent):
    def __init__(self, order_id: str, amount: float) -> None:
        super().__init__(order_id)
        self.amount = amount


class OrderShipped(OrderEvent):
    pass


# Each handler does some I/O before it writes; creating an order is the slowest call.
IO_SECONDS = {"OrderCreated": 0.003, "OrderPaid": 0.002, "OrderShipped": 0.001}
NEXT_STATUS = {None: "OrderCreated", "OrderCreated": "OrderPaid", "OrderPaid": "OrderShipped"}


class OrderProjection:
    """A read model that applies each order's events as they are handled."""

    def __init__(self) -> None:
        self.seen: Dict[str, List[str]] = {}
        self.status: Dict[str, Optional[str]] = {}
        self.invalid_transitions: List[str] = []
        self.payments: Dict[str, float] = {}
        self.receipts: List[str] = []

    async def on_order_event(self, event: OrderEvent) -> None:
        await asyncio.sleep(IO_SECONDS[event.event_type])  # e.g. a call to another service
        current = self.status.get(event.order_id)
        if NEXT_STATUS.get(current) != event.event_type:
            self.invalid_transitions.append(f"{event.order_id}: {current} -> {event.event_type}")
        self.status[event.order_id] = event.event_type
        self.seen.setdefault(event.order_id, []).append(event.event_type)

    async def record_payment(self, event: OrderPaid) -> None:  # priority 1: runs first
        self.payments[event.order_id] = event.amount

    def send_receipt(self, event: OrderPaid) -> None:  # priority 5, a sync handler
        assert event.order_id in self.payments, "the payment is recorded before the receipt"
        self.receipts.append(event.order_id)


@dataclass
class AppResult:
    seen: Dict[str, List[str]]
    invalid_transitions: List[str]
    receipts: List[str]
    waited_ms: float
    statistics: Dict[str, Any]


async def run_application(
    bus_module: Any, wait_for_handlers: Callable[[Any], Awaitable[None]]
) -> AppResult:
    """The application and its test, unchanged between the two buses."""
    bus = bus_module.EventBusFactory.create_in_memory_event_bus(worker_count=4)
    app = OrderProjection()
    for event_type in (OrderCreated, OrderPaid, OrderShipped):
        bus.subscribe(event_type, app.on_order_event, is_async=True, priority=10)
    bus.subscribe(OrderPaid, app.record_payment, is_async=True, priority=1, retry_count=3)
    bus.subscribe(OrderPaid, app.send_receipt, is_async=False, priority=5)

    async with bus_module.EventBusManager(bus) as started:
        for n in (1, 2, 3):
            order = f"o-{n}"
            assert await started.publish(OrderCreated(order)) is True
            assert await started.publish(OrderPaid(order, 10.0 * n)) is True
            assert await started.publish(OrderShipped(order)) is True
        t0 = time.perf_counter()
        await wait_for_handlers(started)
        waited_ms = (time.perf_counter() - t0) * 1000
        stats = started.get_statistics()
        # the test's assertions
        assert stats["events_published"] == 9
        assert stats["events_processed"] == 9, stats
        assert stats["events_failed"] == 0
        assert stats["worker_count"] == 4
        assert sorted(app.receipts) == ["o-1", "o-2", "o-3"]
    return AppResult(app.seen, app.invalid_transitions, app.receipts, waited_ms, stats)


async def sleep_a_bit(bus: Any) -> None:
    await asyncio.sleep(0.1)  # before: "wait long enough"


async def drain(bus: Any) -> None:
    await bus.drain()  # after: returns when every accepted event has been handled


def report(title: str, how: str, r: AppResult) -> int:
    print(f"== {title} ==")
    in_order = 0
    for order, types_seen in sorted(r.seen.items()):
        ok = types_seen == ["OrderCreated", "OrderPaid", "OrderShipped"]
        in_order += ok
        print(f"  {order}: {' -> '.join(types_seen):44} {'in order' if ok else 'OUT OF ORDER'}")
    for t in r.invalid_transitions:
        print(f"  invalid transition: {t}")
    s = r.statistics
    print(f"  receipts sent after their payment was recorded (priority 1 before 5): {len(r.receipts)}")
    print(f"  waited for the handlers with {how}: {r.waited_ms:.1f} ms")
    print(f"  statistics: published={s['events_published']} processed={s['events_processed']} "
          f"failed={s['events_failed']} worker_count={s['worker_count']}")
    return in_order


async def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    print("The one line that changes:")
    print("  - from upbit_auto_trading.infrastructure.events.event_bus import "
          "EventBusFactory, EventBusManager")
    print("  + from oxbus import EventBusFactory, EventBusManager")
    print()

    bus_module: Any = legacy_event_bus
    before = await run_application(bus_module, sleep_a_bit)
    ok_before = report("before: pure-Python InMemoryEventBus, 4 workers",
                       "await asyncio.sleep(0.1)", before)
    print()

    bus_module = oxbus  # <- the migration
    after = await run_application(bus_module, drain)
    ok_after = report("after: oxbus, 4 workers, same application code",
                      "await bus.drain()", after)
    print()

    print("== difference ==")
    print(f"  orders whose events were handled in publish order: before {ok_before}/3, "
          f"after {ok_after}/3")
    print(f"  invalid status transitions: before {len(before.invalid_transitions)}, "
          f"after {len(after.invalid_transitions)}")
    print(f"  waiting in the test: before {before.waited_ms:.1f} ms (a guess), "
          f"after {after.waited_ms:.1f} ms (exact)")
    assert ok_after == 3 and not after.invalid_transitions


if __name__ == "__main__":
    asyncio.run(main())
