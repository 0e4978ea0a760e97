"""The oxbus demo: an order pipeline on an in-memory bus.

Shows per-order ordering with several workers, correlation across a causal chain, a flaky
handler retried with backoff, backpressure, statistics, throughput and the health report.
Run it with `./dev.sh demo`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass

from oxbus import DomainEvent, EventBus, RetryPolicy, current_envelope


@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    order_id: str
    amount: float

    @property
    def aggregate_id(self) -> str:
        return self.order_id


@dataclass(frozen=True)
class PaymentTaken(DomainEvent):
    order_id: str
    amount: float

    @property
    def aggregate_id(self) -> str:
        return self.order_id


@dataclass(frozen=True)
class ReceiptSent(DomainEvent):
    order_id: str


async def pipeline() -> None:
    print("== 1. an order pipeline: 4 workers, ordered per order, correlated ==")
    bus = EventBus(workers=4, max_queue_size=1_000, retry=RetryPolicy(max_attempts=3, base_delay=0.01))
    log: list[str] = []
    flaky_calls = 0

    async def take_payment(e: OrderPlaced) -> None:
        await asyncio.sleep(random.random() / 1000)  # a real await: other orders proceed
        await bus.publish(PaymentTaken(e.order_id, e.amount))

    async def send_receipt(e: PaymentTaken) -> None:
        nonlocal flaky_calls
        flaky_calls += 1
        if flaky_calls % 4 == 1:
            raise ConnectionError("mail server hiccup")  # retried with backoff
        await bus.publish(ReceiptSent(e.order_id))

    def audit(e: DomainEvent) -> None:
        env = current_envelope()
        assert env is not None
        log.append(f"{type(e).__name__:<13} corr={str(env.correlation_id)[:8]} cause={str(env.causation_id)[:8]}")

    bus.subscribe(OrderPlaced, take_payment)
    bus.subscribe(PaymentTaken, send_receipt)
    bus.subscribe(DomainEvent, audit, priority=0)  # a base class: sees every event first
    async with bus:
        for i in range(5):
            await bus.publish(OrderPlaced(f"order-{i}", 10.0 + i))
        await bus.drain(timeout=10)
        stats = bus.get_statistics()
    for line in log[:6]:
        print("  ", line)
    print(f"   ... {len(log)} audit lines; published={stats['events_published']} "
          f"processed={stats['events_processed']} failed calls={stats['events_failed']} "
          f"retried={stats['retried']} dead letters={len(bus.dead_letters)}")


async def throughput(n: int = 200_000) -> None:
    print(f"\n== 2. throughput: {n:,} events, await publish() + one async handler ==")
    bus = EventBus(max_queue_size=10_000)
    handled = 0

    async def handler(e: OrderPlaced) -> None:
        nonlocal handled
        handled += 1

    bus.subscribe(OrderPlaced, handler)
    events = [OrderPlaced(f"o-{i % 100}", 1.0) for i in range(n)]
    async with bus:
        t0 = time.perf_counter()
        for e in events:
            await bus.publish(e)
        await bus.drain()
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        await bus.publish_many(events)
        await bus.drain()
        dt_many = time.perf_counter() - t0
        health = bus.get_health_status()
    print(f"   await publish():  {n / dt:>12,.0f} events/s")
    print(f"   publish_many():   {n / dt_many:>12,.0f} events/s   (handled {handled:,})")
    print("\n== 3. the health report ==")
    keys = ("status", "queue_size", "worker_count", "in_flight", "memory_usage_mb",
            "cpu_percent", "oldest_queued_age_seconds", "error_rate", "uptime_seconds")
    print(json.dumps({k: health[k] for k in keys}, indent=2, default=str))


async def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)  # the flaky handler's errors are expected
    await pipeline()
    await throughput()


if __name__ == "__main__":
    asyncio.run(main())
