"""The pure-Python bus that oxbus replaces, as seed 000 describes it.

A benchmark peer, written the way a careful team writes it (not deliberately slow):
an ``asyncio.Queue``, ``worker_count`` worker tasks doing ``event = await queue.get()``,
a dict of subscriptions keyed by the event's type name and kept sorted by priority
(smaller number first, ties in subscription order), handlers awaited one after another
(sync handlers called directly), a try/except around each handler so one failure never
reaches the publisher or another handler, statistics counters, ``start()`` / ``stop()``,
``publish()`` returning True, and a ``queue.join()``-based ``drain()``.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

logger = logging.getLogger("purepy_bus")


@dataclass(slots=True)
class EventSubscription:
    event_type: str
    handler: Callable[[Any], Any]
    priority: int = 1
    is_async: bool = True
    subscription_id: int = 0
    created_at: float = field(default_factory=time.time)


def _type_name(event_type: Any) -> str:
    return event_type if isinstance(event_type, str) else event_type.__name__


class InMemoryEventBus:
    """``asyncio.Queue`` + worker tasks + ``{type name: [subscriptions by priority]}``."""

    def __init__(self, worker_count: int = 1, max_queue_size: int = 10_000,
                 event_storage: Any = None) -> None:
        self._worker_count = worker_count
        self._max_queue_size = max_queue_size
        self._event_storage = event_storage
        self._queue: asyncio.Queue[Any] | None = None
        self._subscriptions: dict[str, list[EventSubscription]] = {}
        self._ids = itertools.count(1)
        self._workers: list[asyncio.Task[None]] = []
        self._is_running = False
        self._started_at = 0.0
        self._events_published = 0
        self._events_processed = 0
        self._events_failed = 0
        self._total_processing_time = 0.0

    # -- subscriptions -------------------------------------------------------
    def subscribe(self, event_type: Any, handler: Callable[[Any], Any], priority: int = 1,
                  is_async: bool | None = None) -> int:
        if is_async is None or is_async:  # the flag of the original; detect the real kind
            is_async = inspect.iscoroutinefunction(handler)
        sub = EventSubscription(_type_name(event_type), handler, priority, is_async,
                                next(self._ids))
        subs = self._subscriptions.setdefault(sub.event_type, [])
        subs.append(sub)
        subs.sort(key=lambda s: s.priority)  # stable: ties keep subscription order
        return sub.subscription_id

    def unsubscribe(self, subscription_id: int) -> bool:
        for subs in self._subscriptions.values():
            for i, s in enumerate(subs):
                if s.subscription_id == subscription_id:
                    del subs[i]
                    return True
        return False

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        if self._is_running:
            return
        self._queue = asyncio.Queue(maxsize=self._max_queue_size)
        self._is_running = True
        self._started_at = time.time()
        self._workers = [asyncio.create_task(self._worker(i)) for i in range(self._worker_count)]

    async def stop(self) -> None:
        if not self._is_running:
            return
        await self.drain()
        self._is_running = False
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    async def drain(self) -> None:
        if self._queue is not None:
            await self._queue.join()

    # -- publishing ----------------------------------------------------------
    async def publish(self, event: Any) -> bool:
        if not self._is_running:
            raise RuntimeError("event bus is not running")
        if self._event_storage is not None:
            await self._event_storage.store_event(event)
        await self._queue.put(event)  # type: ignore[union-attr]
        self._events_published += 1
        return True

    async def publish_batch(self, events: list[Any]) -> None:
        for event in events:
            await self.publish(event)

    # -- processing ----------------------------------------------------------
    async def _worker(self, worker_id: int) -> None:
        queue = self._queue
        assert queue is not None
        while self._is_running:
            event = await queue.get()
            try:
                await self._process_event(event)
            except Exception:  # never let a worker die
                logger.exception("worker %d failed on %r", worker_id, event)
            finally:
                queue.task_done()

    async def _process_event(self, event: Any) -> None:
        started = time.perf_counter()
        for sub in self._subscriptions.get(type(event).__name__, ()):
            try:
                if sub.is_async:
                    await sub.handler(event)
                else:
                    sub.handler(event)
            except Exception:
                self._events_failed += 1
                logger.exception("handler %r failed on %r", sub.handler, event)
        self._total_processing_time += time.perf_counter() - started
        self._events_processed += 1

    # -- statistics ----------------------------------------------------------
    def get_statistics(self) -> dict[str, Any]:
        processed = self._events_processed
        return {
            "uptime_seconds": time.time() - self._started_at if self._is_running else 0.0,
            "events_published": self._events_published,
            "events_processed": processed,
            "events_failed": self._events_failed,
            "avg_processing_time_ms": self._total_processing_time * 1000 / processed if processed else 0.0,
            "queue_size": self._queue.qsize() if self._queue is not None else 0,
            "subscription_count": sum(len(s) for s in self._subscriptions.values()),
            "is_running": self._is_running,
            "worker_count": self._worker_count,
        }


class EventBusFactory:
    @staticmethod
    def create_in_memory_event_bus(worker_count: int = 1, **kwargs: Any) -> InMemoryEventBus:
        return InMemoryEventBus(worker_count=worker_count, **kwargs)
