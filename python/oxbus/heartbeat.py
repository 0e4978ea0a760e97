"""Heartbeats: a source says "alive" every ``interval`` seconds; every bus that
sees the events lists the last one per source in its health report.

```python
handle = await bus.broadcast_heartbeat("pricing", interval=5.0)   # one now, then every 5 s
bus.get_health_status()["heartbeats"]
# {"pricing": {"last_seen": datetime(...), "age_seconds": 0.01, "stale": False,
#              "interval": 5.0, "sequence": 1}}
handle.cancel()                    # or let bus.stop() end it
```

A source is *stale* once no heartbeat arrived for more than 1.5 × its interval (the interval travels
in each [`Heartbeat`][oxbus.heartbeat.Heartbeat], so a bus watching another process's heartbeats
needs no configuration: call [`watch`][oxbus.heartbeat.watch] on it, or broadcast from it). Times
come from the bus's clock when it has one (``EventBus(clock=ManualClock())``), so tests advance time
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Optional, Protocol

from oxbus.errors import BusClosed, ConfigurationError, NotConsuming
from oxbus.events import DomainEvent

__all__ = ["STALE_AFTER", "Heartbeat", "HeartbeatHandle", "HeartbeatMonitor", "watch"]

logger = logging.getLogger("oxbus")

#: A source is stale when its last heartbeat is older than this many of its intervals.
STALE_AFTER = 1.5

#: The subscription name of the bus's own heartbeat listener.
_SUBSCRIPTION = "oxbus.heartbeat-monitor"


class Bus(Protocol):
    """What the monitor uses of an ``oxbus.EventBus`` (spelled here, so this module does not
    import the bus, which imports it)."""

    _heartbeats: Optional[HeartbeatMonitor]

    @property
    def clock(self) -> Any: ...

    @property
    def is_running(self) -> bool: ...

    def subscribe(
        self, event_type: Any, handler: Callable[[Any], Any], *, priority: int = ..., name: str | None = ...
    ) -> str: ...

    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool: ...


@dataclass(frozen=True)
class Heartbeat(DomainEvent):
    """"``source`` is alive": the ``sequence``-th heartbeat of that source, sent at
    ``sent_at`` (UTC), promising the next within ``interval`` seconds. Its type key is
    ``"oxbus.heartbeat"`` and its ordering key the source."""

    source: str
    sequence: int
    sent_at: datetime
    interval: float

    event_type: ClassVar[str] = "oxbus.heartbeat"

    @property
    def aggregate_id(self) -> str:
        return self.source


@dataclass
class _Seen:
    clock_time: float
    wall_time: datetime
    interval: float
    sequence: int


class HeartbeatHandle:
    """A running broadcast: ``source``, ``interval``, ``sequence`` (the last sent),
    ``running``, and ``cancel()``."""

    def __init__(self, monitor: HeartbeatMonitor, source: str, interval: float) -> None:
        self._monitor = monitor
        self.source = source
        self.interval = interval
        self.sequence = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether heartbeats are still being sent."""
        return self._task is not None and not self._task.done()

    def cancel(self) -> None:
        """Stops broadcasting. Watchers see the source turn stale after 1.5 intervals."""
        if self._task is not None:
            self._task.cancel()
        self._monitor._broadcasts.pop(self.source, None)

    async def wait_closed(self) -> None:
        """Waits until the broadcast task has ended (after ``cancel()`` or the bus's stop)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return (
            f"<HeartbeatHandle {self.source!r} every {self.interval}s {state} "
            f"sequence={self.sequence}>"
        )


class HeartbeatMonitor:
    """One bus's heartbeat table and broadcasts. Made by [`watch`][oxbus.heartbeat.watch] (or
    the bus's first ``broadcast_heartbeat``); subscribes to
    [`Heartbeat`][oxbus.heartbeat.Heartbeat] on that bus."""

    def __init__(self, bus: Bus, listen: bool = True) -> None:
        self._bus = bus
        self._seen: dict[str, _Seen] = {}
        self._broadcasts: dict[str, HeartbeatHandle] = {}
        clock = bus.clock
        self._now: Callable[[], float] = clock.time if clock is not None else time.monotonic
        self._sleep: Callable[[float], Any] = clock.sleep if clock is not None else asyncio.sleep
        self.subscription: str | None = None
        try:
            self.listen()
        except NotConsuming:
            # A broker bus running without its group receives nothing: it may still
            # broadcast (listen=False); watch() on it raises.
            if listen:
                raise

    def listen(self) -> None:
        """Subscribes the heartbeat table to ``Heartbeat`` on the bus (once)."""
        if self.subscription is None:
            # Smallest priority number: runs before the user's heartbeat handlers.
            self.subscription = self._bus.subscribe(
                Heartbeat, self._on_heartbeat, priority=-1_000_000, name=_SUBSCRIPTION
            )

    async def _on_heartbeat(self, beat: Heartbeat) -> None:
        # async (not def): it must run on the loop even with sync_handlers="thread".
        if not isinstance(beat.interval, (int, float)) or not isinstance(beat.source, str):
            return
        self._seen[beat.source] = _Seen(
            self._now(), datetime.now(timezone.utc), float(beat.interval), int(beat.sequence)
        )

    def report(self) -> dict[str, dict[str, Any]]:
        """``{source: {last_seen, age_seconds, stale, interval, sequence}}``."""
        now = self._now()
        out: dict[str, dict[str, Any]] = {}
        for source, seen in sorted(self._seen.items()):
            age = max(0.0, now - seen.clock_time)
            out[source] = {
                "last_seen": seen.wall_time,
                "age_seconds": age,
                "stale": age > STALE_AFTER * seen.interval,
                "interval": seen.interval,
                "sequence": seen.sequence,
            }
        return out

    async def broadcast(self, source: str, interval: float) -> HeartbeatHandle:
        """Publishes a heartbeat of ``source`` now, then every ``interval`` seconds until
        the bus stops or the handle is cancelled."""
        if not isinstance(source, str) or not source:
            raise ConfigurationError(f"source must be a non-empty str, got {source!r}")
        if (
            isinstance(interval, bool)
            or not isinstance(interval, (int, float))
            or not (interval > 0 and math.isfinite(interval))
        ):
            raise ConfigurationError(f"interval must be a number of seconds > 0, got {interval!r}")
        if source in self._broadcasts and self._broadcasts[source].running:
            raise ConfigurationError(
                f"this bus already broadcasts heartbeats of {source!r}; cancel that handle first"
            )
        handle = HeartbeatHandle(self, source, float(interval))
        first = self._now()
        await self._beat(handle)  # raises BusNotStarted / BusClosed as publish() does
        handle._task = asyncio.get_running_loop().create_task(
            self._run(handle, first + handle.interval), name=f"oxbus-heartbeat-{source}"
        )
        self._broadcasts[source] = handle
        return handle

    async def _beat(self, handle: HeartbeatHandle) -> None:
        handle.sequence += 1
        await self._bus.publish(
            Heartbeat(handle.source, handle.sequence, datetime.now(timezone.utc), handle.interval)
        )

    async def _run(self, handle: HeartbeatHandle, due: float) -> None:
        # Beats are due at fixed times (no drift from the time a publish takes); after a
        # stall longer than an interval one beat goes out and the schedule restarts from now,
        # rather than a burst of the missed ones.
        try:
            while True:
                wait = due - self._now()
                if wait > 0:
                    await self._sleep(wait)
                if not self._bus.is_running:
                    return
                await self._beat(handle)
                due += handle.interval
                now = self._now()
                if due <= now:
                    due = now + handle.interval
        except BusClosed:
            return
        except Exception:
            logger.exception("heartbeat of %r stopped", handle.source)
        finally:
            if self._broadcasts.get(handle.source) is handle:
                del self._broadcasts[handle.source]

    async def stop(self) -> None:
        """Cancels every broadcast and waits for them to end (called by ``bus.stop()``)."""
        handles = list(self._broadcasts.values())
        for h in handles:
            h.cancel()
        for h in handles:
            await h.wait_closed()

    @property
    def broadcasts(self) -> list[HeartbeatHandle]:
        """The broadcasts running on this bus."""
        return list(self._broadcasts.values())


def watch(bus: Bus, listen: bool = True) -> HeartbeatMonitor:
    """The bus's heartbeat monitor, made (and subscribed) on first use: call it on a bus that
    only listens to other processes' heartbeats, so its health lists them. ``listen=False``
    (a bus that broadcasts): a broker bus that runs without having joined its group (it
    receives nothing) is not subscribed, rather than refused."""
    monitor: HeartbeatMonitor | None = getattr(bus, "_heartbeats", None)
    if monitor is None:
        monitor = HeartbeatMonitor(bus, listen)
        bus._heartbeats = monitor
    elif listen:
        monitor.listen()
    return monitor

