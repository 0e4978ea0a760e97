#!/usr/bin/env python3
"""A small workload to profile under callgrind: N `await bus.publish(e)` then `drain()`.

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.ox.out \
        .venv/bin/python benches/profile_publish.py oxbus async 20000
    callgrind_annotate /tmp/cg.ox.out | head -60

Instruction counts are repeatable whatever the machine's load, unlike wall-clock time. The
measured region (publishing and draining, after a warm-up) lies between two markers,
`os.getppid()` and `os.getpgrp()`: run callgrind with `--zero-before=os_getppid
--dump-before=os_getpgrp` and read the dump (benches/callgrind_per_event.sh does, for two N,
and divides the difference by the difference of N).
`bus`: oxbus | core (the native publish call alone) | purepy | many (oxbus publish_many, batches of 1000) | deque (a "bus" whose
publish appends to a deque, one loop popping and calling: what a Python-level publish costs
by itself). `none`: the two markers alone. `kind`: async | sync. Optional 4th/5th arguments: workers (1), subscriptions (1).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import purepy_bus  # noqa: E402

from oxbus import DomainEvent, EventBus  # noqa: E402

KEYS = [f"order-{k}" for k in range(64)]


class OrderPlaced(DomainEvent):
    def __init__(self, order_id: str, amount: float) -> None:
        super().__init__()
        self.order_id = order_id
        self.amount = amount

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class DequeBus:
    """The least a Python-level `async def publish` bus can cost."""

    def __init__(self) -> None:
        self.q: collections.deque = collections.deque()
        self.hs: list = []
        self.asyncs: bool = True

    def subscribe(self, _t: object, h: object) -> None:
        self.hs.append(h)
        self.asyncs = asyncio.iscoroutinefunction(h)

    async def publish(self, e: object) -> bool:
        self.q.append(e)
        return True

    async def drain(self) -> None:
        q, hs = self.q, self.hs
        while q:
            e = q.popleft()
            for h in hs:
                if self.asyncs:
                    await h(e)
                else:
                    h(e)


async def main(which: str, kind: str, n: int, workers: int, subs: int) -> None:
    count = [0]
    hs = []
    for _ in range(subs):
        if kind == "async":
            async def h(e: object) -> None:
                count[0] += 1
        else:
            def h(e: object) -> None:  # type: ignore[misc]
                count[0] += 1
        hs.append(h)
    if which == "none":  # nothing: the markers' own cost
        os.getppid()
        os.getpgrp()
        return
    if which == "purepy":
        bus: object = purepy_bus.InMemoryEventBus(worker_count=workers, max_queue_size=10_000)
    elif which == "deque":
        bus = DequeBus()
    else:
        bus = EventBus(workers=workers, max_queue_size=10_000 if which != "core" else 0)
    for h in hs:
        bus.subscribe(OrderPlaced, h)  # type: ignore[attr-defined]
    if which not in ("deque",):
        await bus.start()  # type: ignore[attr-defined]
    if which not in ("deque",):
        # Warm-up outside the measured region: routes cached, clocks calibrated.
        for i in range(200):
            await bus.publish(OrderPlaced(KEYS[i & 63], float(i)))  # type: ignore[attr-defined]
        await bus.drain()  # type: ignore[attr-defined]
        count[0] = 0
    events = [OrderPlaced(KEYS[i & 63], float(i)) for i in range(n)]
    gc.freeze()
    os.getppid()  # marker: callgrind --zero-before=os_getppid starts counting here
    if which == "core":  # the native call alone, without EventBus.publish's coroutine
        core = bus._core  # type: ignore[attr-defined]
        for e in events:
            if core.publish(e, None, None) is not None:
                raise RuntimeError("profile with a queue large enough for N")
    elif which == "many":
        for i in range(0, n, 1000):
            await bus.publish_many(events[i : i + 1000])  # type: ignore[attr-defined]
    else:
        publish = bus.publish  # type: ignore[attr-defined]
        for e in events:
            await publish(e)
    await bus.drain()  # type: ignore[attr-defined]
    os.getpgrp()  # marker: callgrind --dump-before=os_getpgrp ends the region here
    assert count[0] == n * subs, (count[0], n * subs)
    if which not in ("deque",):
        await bus.stop()  # type: ignore[attr-defined]


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], int(a[2]), int(a[3]) if len(a) > 3 else 1,
                     int(a[4]) if len(a) > 4 else 1))
