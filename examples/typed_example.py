"""A small fully typed use of the public API; CI runs `mypy --strict` on it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from oxbus import DomainEvent, EventBus, Memory, RedisStreams, RetryPolicy, Transport, current_envelope
from oxbus.errors import QueueFull


@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    order_id: str
    amount: float

    @property
    def aggregate_id(self) -> str:
        return self.order_id


@dataclass(frozen=True)
class ReceiptSent(DomainEvent):
    order_id: str


async def main() -> int:
    # Made (and checked), not connected: a Redis bus would take it as transport=.
    redis: Transport = RedisStreams("redis://127.0.0.1:6379/0", group="billing", partitions=2)
    assert isinstance(redis, RedisStreams) and redis.partitions == 2
    bus = EventBus(
        transport=Memory(), workers=2, max_queue_size=100,
        retry=RetryPolicy(max_attempts=2, base_delay=0.01),
    )
    sent: list[str] = []

    async def send_receipt(event: OrderPlaced) -> None:
        env = current_envelope()
        assert env is not None
        await bus.publish(ReceiptSent(event.order_id))

    def record(event: ReceiptSent) -> None:
        sent.append(event.order_id)

    sub: str = bus.subscribe(OrderPlaced, send_receipt, priority=1)
    bus.subscribe(ReceiptSent, record)
    async with bus:
        ok: bool = await bus.publish(OrderPlaced("o-1", 9.5))
        n: int = await bus.publish_many([OrderPlaced(f"o-{i}", 1.0) for i in range(2, 5)])
        try:
            bus.publish_nowait(OrderPlaced("o-5", 2.0))
        except QueueFull:
            pass
        await bus.drain(timeout=5)
        stats = bus.get_statistics()
        assert ok and n == 3 and stats["events_published"] >= 4
    assert bus.unsubscribe(sub)
    return len(sent)


if __name__ == "__main__":
    print(asyncio.run(main()))
