"""The oxbus demo: an order pipeline on an in-memory bus, and the same kind of pipeline on a
durable bus whose log ``oxbus flow`` can draw.

Shows per-order ordering with several workers, correlation across a causal chain, a flaky
handler retried with backoff, backpressure, statistics, throughput and the health report.
Run it with ``oxbus demo`` (``oxbus demo --db demo.db`` also writes a durable log), or
``./dev.sh demo`` from a checkout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from oxbus import DomainEvent, EventBus, RetryPolicy, current_envelope

__all__ = ["durable_pipeline", "main", "pipeline", "run", "throughput"]

Out = Callable[[str], None]


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


@dataclass(frozen=True)
class PaymentDeclined(DomainEvent):
    order_id: str
    reason: str

    @property
    def aggregate_id(self) -> str:
        return self.order_id


@dataclass(frozen=True)
class StockReserved(DomainEvent):
    order_id: str

    @property
    def aggregate_id(self) -> str:
        return self.order_id


@dataclass(frozen=True)
class OrderShipped(DomainEvent):
    order_id: str

    @property
    def aggregate_id(self) -> str:
        return self.order_id


async def pipeline(out: Out = print) -> dict[str, Any]:
    """An order pipeline: 4 workers, ordered per order, correlated, one flaky handler."""
    out("== 1. an order pipeline: 4 workers, ordered per order, correlated ==")
    bus = EventBus(
        workers=4, max_queue_size=1_000, retry=RetryPolicy(max_attempts=3, base_delay=0.01)
    )
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
        log.append(
            # In full: ids are time-ordered UUIDs, so their first characters all look alike.
            f"{type(e).__name__:<13} corr={env.correlation_id} cause={env.causation_id}"
        )

    bus.subscribe(OrderPlaced, take_payment)
    bus.subscribe(PaymentTaken, send_receipt)
    bus.subscribe(DomainEvent, audit, priority=0)  # a base class: sees every event first
    async with bus:
        for i in range(5):
            await bus.publish(OrderPlaced(f"order-{i}", 10.0 + i))
        await bus.drain(timeout=10)
        stats = bus.get_statistics()
    for line in log[:6]:
        out(f"   {line}")
    out(
        f"   ... {len(log)} audit lines; published={stats['events_published']} "
        f"processed={stats['events_processed']} failed calls={stats['events_failed']} "
        f"retried={stats['retried']} dead letters={len(bus.dead_letters)}"
    )
    return {
        "audit_lines": len(log),
        "published": stats["events_published"],
        "processed": stats["events_processed"],
        "failed_calls": stats["events_failed"],
        "retried": stats["retried"],
        "dead_letters": len(bus.dead_letters),
    }


async def throughput(n: int = 200_000, out: Out = print) -> dict[str, Any]:
    """``n`` events through ``await publish()`` and ``publish_many()``, then the health report."""
    out(f"\n== 2. throughput: {n:,} events, await publish() + one async handler ==")
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
    out(f"   await publish():  {n / dt:>12,.0f} events/s")
    out(f"   publish_many():   {n / dt_many:>12,.0f} events/s   (handled {handled:,})")
    out("\n== 3. the health report ==")
    keys = (
        "status",
        "queue_size",
        "worker_count",
        "in_flight",
        "memory_usage_mb",
        "cpu_percent",
        "oldest_queued_age_seconds",
        "error_rate",
        "uptime_seconds",
    )
    report = {k: health[k] for k in keys}
    out(json.dumps(report, indent=2, default=str))
    return {
        "events": n,
        "publish_per_second": n / dt,
        "publish_many_per_second": n / dt_many,
        "handled": handled,
        "health": json.loads(json.dumps(report, default=str)),
    }


async def durable_pipeline(
    path: str | os.PathLike[str], orders: int = 12, out: Out = print
) -> dict[str, Any]:
    """The order pipeline on a durable bus logging to ``path`` (appended to if it exists).

    ``OrderPlaced`` goes to ``take_payment`` (which publishes ``PaymentTaken``, or
    ``PaymentDeclined`` over 150) and ``reserve_stock`` (``StockReserved``; out of stock for
    every fifth order from the fourth: dead letters after 3 attempts); ``PaymentTaken`` goes to
    ``send_receipt`` (fails once for every fourth order, then succeeds: ``ReceiptSent``) and
    ``ship_order`` (``OrderShipped``); ``PaymentDeclined`` to ``notify_customer``. ``oxbus flow PATH`` draws it.
    """
    path = os.fspath(path)
    out(f"\n== 4. the pipeline on a durable bus: {orders} orders logged to {path} ==")
    bus = EventBus(store=path, workers=4, retry=RetryPolicy(max_attempts=3, base_delay=0.005))

    async def take_payment(e: OrderPlaced) -> None:
        if e.amount > 150:
            await bus.publish(PaymentDeclined(e.order_id, "over the card limit"))
        else:
            await bus.publish(PaymentTaken(e.order_id, e.amount))

    async def reserve_stock(e: OrderPlaced) -> None:
        if int(e.order_id.rsplit("-", 1)[1]) % 5 == 3:
            raise LookupError(f"{e.order_id}: out of stock")  # retried, then a dead letter
        await bus.publish(StockReserved(e.order_id))

    async def send_receipt(e: PaymentTaken) -> None:
        env = current_envelope()
        assert env is not None
        if env.attempt == 1 and int(e.order_id.rsplit("-", 1)[1]) % 4 == 0:
            raise ConnectionError("mail server hiccup")  # retried with backoff: succeeds
        await bus.publish(ReceiptSent(e.order_id))

    async def ship_order(e: PaymentTaken) -> None:
        await bus.publish(OrderShipped(e.order_id))

    def notify_customer(e: PaymentDeclined) -> None:
        pass

    # Durable subscriptions get explicit names: unique, and stable across code moves.
    bus.subscribe(OrderPlaced, take_payment, name="take_payment")
    bus.subscribe(OrderPlaced, reserve_stock, name="reserve_stock")
    bus.subscribe(PaymentTaken, send_receipt, name="send_receipt")
    bus.subscribe(PaymentTaken, ship_order, name="ship_order")
    bus.subscribe(PaymentDeclined, notify_customer, name="notify_customer")
    async with bus:
        for i in range(orders):
            await bus.publish(OrderPlaced(f"order-{i}", 10.0 + 15 * i))
        await bus.drain(timeout=30)
        stats = bus.get_statistics()
        dead = len(bus.dead_letters)
    out(
        f"   published={stats['events_published']} failed calls={stats['events_failed']} "
        f"retried={stats['retried']} dead letters={dead}"
    )
    out(
        f"   look into it: oxbus stats {path};  oxbus dlq {path} list;  "
        f"oxbus flow {path} -o flow.png"
    )
    return {
        "db": path,
        "orders": orders,
        "published": stats["events_published"],
        "failed_calls": stats["events_failed"],
        "retried": stats["retried"],
        "dead_letters": dead,
    }


async def main(
    events: int = 200_000, db: str | os.PathLike[str] | None = None, out: Out = print
) -> dict[str, Any]:
    """The whole demo; returns what it measured."""
    logging.basicConfig(level=logging.CRITICAL)  # the flaky handler's errors are expected
    report: dict[str, Any] = {"pipeline": await pipeline(out)}
    if events > 0:
        report["throughput"] = await throughput(events, out)
    if db is not None:
        report["durable"] = await durable_pipeline(db, out=out)
    return report


def run(
    events: int = 200_000, db: str | os.PathLike[str] | None = None, out: Out = print
) -> dict[str, Any]:
    """Runs :func:`main` in a new event loop."""
    return asyncio.run(main(events, db, out))


if __name__ == "__main__":
    run()
