"""Two processes, one bus: events published in one process are handled in another, over
Redis Streams.

This script is both sides. Run without arguments, it is the publisher: it starts a copy of
itself as the consumer (``--consumer``), waits until the consumer's group exists, publishes
N ``OrderPlaced`` events and waits until the consumer reports that it handled all of them.
The two buses differ only in their consumer group: every group gets every event, and the
processes of one group share them (start more consumers with the same ``group=`` to scale out).

Needs a Redis server on 127.0.0.1:6379 (else it says so on stderr and exits 1).

Run: .venv/bin/python examples/redis_two_processes.py [N]
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid

from oxbus import DomainEvent, EventBus, TransportError

REDIS = "redis://127.0.0.1:6379/0"


class OrderPlaced(DomainEvent):
    """Rebuilt as this class in the consumer: both processes define it (same name)."""

    def __init__(self, order_id: str, amount: float, **kw: object) -> None:
        super().__init__(**kw)
        self.order_id = order_id
        self.amount = amount

    @property
    def aggregate_id(self) -> str:  # same order, same partition, handled in order
        return self.order_id


async def consumer(stream: str, n: int) -> None:
    """Handles OrderPlaced events in group "billing"; says "ready", then "handled <n> <total>"."""
    bus = EventBus(transport=REDIS, group="billing", stream=stream)
    count, total = 0, 0.0
    done = asyncio.Event()

    async def bill(event: OrderPlaced) -> None:
        nonlocal count, total
        count += 1
        total += event.amount
        if count == n:
            done.set()

    bus.subscribe(OrderPlaced, bill)
    async with bus:  # start: joins the group (created if needed)
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 30)
    print(f"handled {count} {total:.2f}", flush=True)


async def publisher(n: int) -> int:
    stream = f"oxbus-example:{uuid.uuid4().hex[:8]}"
    bus = EventBus(transport=REDIS, group="shop", stream=stream)
    try:
        await bus.start()
    except TransportError as e:
        print(
            f"Redis is not reachable ({e}); start one with `redis-server` to run this example.",
            file=sys.stderr,
        )
        return 1
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--consumer", stream, str(n), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    try:
        assert await asyncio.wait_for(child.stdout.readline(), 20) == b"ready\n"
        t0 = time.perf_counter()
        events = [OrderPlaced(f"order-{i % 10}", 1.5) for i in range(n)]
        await bus.publish_many(events)  # returns once Redis accepted every event
        published = time.perf_counter() - t0
        line = (await asyncio.wait_for(child.stdout.readline(), 30)).decode().split()
        elapsed = time.perf_counter() - t0
        await bus.stop()
        assert line[:2] == ["handled", str(n)], line
        print(f"published {n} OrderPlaced events to {stream} in {published * 1000:.0f} ms")
        print(
            f"the consumer process (group 'billing') handled {line[1]} of them, "
            f"total amount {line[2]}, {elapsed * 1000:.0f} ms after the first publish"
        )
        return 0 if await child.wait() == 0 else 1
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        _delete(stream)


def _delete(stream: str) -> None:
    """Housekeeping for the demo: DEL its stream (one RESP command, no client library)."""
    key = stream.encode()
    with socket.create_connection(("127.0.0.1", 6379), timeout=2) as s:
        s.sendall(b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(key), key))
        s.recv(64)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--consumer"]:
        asyncio.run(consumer(sys.argv[2], int(sys.argv[3])))
    else:
        sys.exit(asyncio.run(publisher(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)))
