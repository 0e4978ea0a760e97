"""Helpers for tests: a manual clock, so retry backoff and circuit-breaker cool-downs complete
instantly and deterministically.

::

    clock = ManualClock()
    bus = EventBus(clock=clock, retry=RetryPolicy(max_attempts=3, base_delay=1.0, jitter=0))
    ...
    await bus.publish(event)
    await clock.drain(bus)      # advances time whenever the bus waits on it, until drained
    assert clock.time() == 3.0  # 1 s + 2 s of backoff, taken in no real time
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oxbus.bus import EventBus

__all__ = ["ManualClock"]


class ManualClock:
    """A clock that moves only when told: ``sleep`` waits until ``advance`` passes its
    deadline. Give it to ``EventBus(clock=...)``."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._changed: asyncio.Event | None = None

    def time(self) -> float:
        """The clock's current time, in seconds."""
        return self._now

    async def sleep(self, seconds: float) -> None:
        """Waits until the clock has advanced by ``seconds``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + max(0.0, seconds), next(self._seq), fut))
        self._signal()
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> int:
        """Moves time forward; wakes the sleeps now due, in deadline order. Returns how many."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back: advance({seconds!r})")
        self._now += seconds
        woken = 0
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
                woken += 1
        return woken

    def _signal(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def drain(self, bus: EventBus, timeout: float = 10.0) -> None:
        """Runs the bus to quiescence: whenever it waits on this clock, jumps to the next
        deadline; returns once ``bus.drain()`` does. Raises ``TimeoutError`` after
        ``timeout`` real seconds."""

        async def run() -> None:
            self._changed = asyncio.Event()
            drained = asyncio.ensure_future(bus.drain())
            try:
                while not drained.done():
                    # Let every task reach its next wait before time moves.
                    for _ in range(3):
                        await asyncio.sleep(0)
                    if drained.done():
                        break
                    pending = [d for d, _, f in self._sleepers if not f.done()]
                    if pending:
                        self.advance(max(0.0, min(pending) - self._now))
                        continue
                    # Nothing sleeps on this clock: wait for a sleep or for the drain.
                    self._changed.clear()
                    waiter = asyncio.ensure_future(self._changed.wait())
                    await asyncio.wait({drained, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                drained.result()
            finally:
                drained.cancel()
                self._changed = None

        try:
            await asyncio.wait_for(run(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the bus did not drain within {timeout}s of real time") from None

    def __repr__(self) -> str:
        return f"ManualClock(time={self._now}, sleepers={self.sleepers})"
