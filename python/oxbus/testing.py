"""Helpers for tests: a manual clock, so retry backoff and circuit-breaker cool-downs complete
instantly and deterministically; an event recorder and assertions that wait on the bus
(``EventRecorder``, ``assert_published``, ``assert_not_published``, ``assert_handled``; the
pytest plugin's ``event_recorder`` fixture is an ``EventRecorder``); handler calls
(``record_calls``) and handler failures (``HandlerErrors``), which the plugin's ``event_bus``
fixture records.

```python
clock = ManualClock()
bus = EventBus(clock=clock, retry=RetryPolicy(max_attempts=3, base_delay=1.0, jitter=0))
...
await bus.publish(event)
await clock.drain(bus)      # advances time whenever the bus waits on it, until drained
assert clock.time() == 3.0  # 1 s + 2 s of backoff, taken in no real time
```
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import itertools
import weakref
from enum import Enum
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar, cast, overload

# Handler calls and failures are recorded in _handler_calls; its public names are this module's.
from oxbus._handler_calls import (
    Call,
    HandlerError,
    HandlerErrors,
    _call_log,
    _name,
    record_calls,
)

for _public in (Call, HandlerError, HandlerErrors, record_calls):
    _public.__module__ = __name__  # shown, documented and pickled as oxbus.testing's
del _public

if TYPE_CHECKING:
    from oxbus.bus import EventBus

__all__ = [
    "Call",
    "EventRecorder",
    "HandlerError",
    "HandlerErrors",
    "ManualClock",
    "assert_handled",
    "assert_not_published",
    "assert_published",
    "record_calls",
]

E = TypeVar("E")


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


# ------------------------------------------------------------------ recording events


def _type_key(event: Any) -> str:
    raw = event.get("event_type") if isinstance(event, dict) else getattr(event, "event_type", None)
    if isinstance(raw, Enum):
        raw = raw.value
    return type(event).__name__ if raw is None else str(raw)


def _topic_matches(pattern: list[str], words: list[str]) -> bool:
    # AMQP topics: "*" one word, "#" zero or more.
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_matches(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_matches(rest, words[1:])


def _matches(target: Any, event: Any) -> bool:
    """The bus's routing rule, in Python: a class matches instances (subclasses too), a
    string the type key (a pattern with ``*`` / ``#`` its words), an Enum member its value."""
    if isinstance(target, type):
        return isinstance(event, target)
    if isinstance(target, Enum):
        target = target.value
    key = _type_key(event)
    if "*" in target or "#" in target:
        return _topic_matches(target.split("."), key.split("."))
    return bool(key == target)


#: The recorder attached to each bus (used by ``assert_published(bus, ...)``).
_recorders: weakref.WeakKeyDictionary[Any, EventRecorder] = weakref.WeakKeyDictionary()


class EventRecorder:
    """Captures every event a bus accepts, in acceptance order, from now until ``close()``.

    It watches the bus's publish side (as ``bus.wait_for`` does) rather than subscribing a
    handler, so it does not change statistics, routing or subscriptions, and an event is in
    ``events`` as soon as ``await bus.publish()`` returns — before its handlers run:

    ```python
    recorder = EventRecorder(bus)
    await bus.publish(OrderPlaced("o-1", 9.5))
    await recorder.first(ReceiptSent)             # published by a handler, maybe later
    assert [e.order_id for e in recorder.of_type(OrderPlaced)] == ["o-1"]
    ```

    The pytest plugin's ``event_recorder`` fixture is one of these on the ``event_bus``.
    """

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.events: list[Any] = []
        self._pending: list[tuple[Any, Callable[[Any], bool] | None, asyncio.Future[Any]]] = []
        # Never resolved: the tap records and answers "no match" for every event.
        self._sink: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._waiter: int | None = bus._core.add_waiter(object, self._tap, cast(Any, self._sink))
        _recorders[bus] = self

    def _tap(self, event: Any) -> bool:
        self.events.append(event)
        if self._pending:
            keep = []
            for target, predicate, fut in self._pending:
                if fut.done():
                    continue
                try:
                    hit = _matches(target, event) and (predicate is None or bool(predicate(event)))
                except Exception as e:  # noqa: BLE001 - handed to the waiting test
                    fut.set_exception(e)
                    continue
                if hit:
                    fut.set_result(event)
                else:
                    keep.append((target, predicate, fut))
            self._pending = keep
        return False

    @overload
    def of_type(self, event_type: type[E]) -> list[E]: ...
    @overload
    def of_type(self, event_type: Any) -> list[Any]: ...
    def of_type(self, event_type: Any) -> list[Any]:
        """The recorded events matching a class (subclasses too), a type string, a pattern
        (``"order.*"``) or an Enum member — the bus's routing rule."""
        return [e for e in self.events if _matches(event_type, e)]

    def types(self) -> list[str]:
        """The type keys of the recorded events, in order (handy in assertion messages)."""
        return [_type_key(e) for e in self.events]

    def clear(self) -> None:
        """Forgets the events recorded so far."""
        self.events.clear()

    @overload
    def wait_for(
        self, event_type: type[E], predicate: Callable[[E], bool] | None = None,
        timeout: float | None = 1.0,
    ) -> Awaitable[E]: ...
    @overload
    def wait_for(
        self, event_type: Any, predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = 1.0,
    ) -> Awaitable[Any]: ...
    def wait_for(
        self, event_type: Any, predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = 1.0,
    ) -> Awaitable[Any]:
        """The first matching event the bus accepts after this call, as ``bus.wait_for``:
        it listens from the moment it is called (``w = recorder.wait_for(X)``, then
        ``await bus.publish(x)``, then ``await w``), and events recorded before do not count
        (``first`` takes those too). Raises ``TimeoutError`` (naming what was recorded)
        after ``timeout`` seconds."""
        return self._wait(self._listen(event_type, predicate), event_type, predicate, timeout)

    @overload
    async def first(
        self, event_type: type[E], predicate: Callable[[E], bool] | None = None,
        timeout: float | None = 1.0,
    ) -> E: ...
    @overload
    async def first(
        self, event_type: Any, predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = 1.0,
    ) -> Any: ...
    async def first(
        self, event_type: Any, predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = 1.0,
    ) -> Any:
        """The first recorded matching event — one recorded already, else the next one the
        bus accepts. Raises ``TimeoutError`` (naming what was recorded) after ``timeout``
        seconds; no sleeping, it wakes when the event is published."""
        for e in self.events:
            if _matches(event_type, e) and (predicate is None or predicate(e)):
                return e
        return await self._wait(self._listen(event_type, predicate), event_type, predicate, timeout)

    def _listen(
        self, event_type: Any, predicate: Callable[[Any], bool] | None
    ) -> tuple[asyncio.Future[Any], int]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((event_type, predicate, fut))
        return fut, len(self.events)

    async def _wait(
        self, listening: tuple[asyncio.Future[Any], int], event_type: Any,
        predicate: Callable[[Any], bool] | None, timeout: float | None,
    ) -> Any:
        fut, recorded_before = listening
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            before = sum(
                1 for e in self.events[:recorded_before]
                if _matches(event_type, e) and (predicate is None or predicate(e))
            )
            hint = (
                f" ({before} matching event(s) recorded before the call: first() takes those)"
                if before else ""
            )
            raise TimeoutError(
                f"no {_name(event_type)} event{' matching the predicate' if predicate else ''} "
                f"within {timeout}s; recorded: {self.types() or 'nothing'}{hint}"
            ) from None
        finally:
            fut.cancel()

    def calls(self, handler: Callable[..., Any]) -> list[Any]:
        """The events ``handler`` was called with on this bus, in call order, retries
        included (``record_calls``; the ``event_bus`` fixture records them)."""
        return [c.event for c in _call_log(self.bus).of(handler)]

    async def assert_handled(
        self, handler: Callable[..., Any], event: Any, timeout: float | None = 5.0
    ) -> None:
        """Drains the bus, then raises ``AssertionError`` unless a call of ``handler`` with
        ``event`` (the same object, or an equal one) returned without raising."""
        await assert_handled(self.bus, handler, event, timeout)

    def close(self) -> None:
        """Stops recording (the events recorded stay). Idempotent."""
        if self._waiter is not None:
            self.bus._core.remove_waiter(self._waiter)
            self._waiter = None
        if _recorders.get(self.bus) is self:
            del _recorders[self.bus]
        for _, _, fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def __enter__(self) -> EventRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.events)

    def __repr__(self) -> str:
        return f"<EventRecorder {len(self.events)} events: {self.types()[-5:]}>"


@overload
async def assert_published(
    bus_or_recorder: EventBus | EventRecorder, event_type: type[E],
    predicate: Callable[[E], bool] | None = None, timeout: float | None = 1.0,
) -> E: ...
@overload
async def assert_published(
    bus_or_recorder: EventBus | EventRecorder, event_type: Any,
    predicate: Callable[[Any], bool] | None = None, timeout: float | None = 1.0,
) -> Any: ...
async def assert_published(
    bus_or_recorder: EventBus | EventRecorder, event_type: Any,
    predicate: Callable[[Any], bool] | None = None, timeout: float | None = 1.0,
) -> Any:
    """Waits (without sleeping) until a matching event is published and returns it; raises
    ``AssertionError`` after ``timeout`` seconds.

    Given a recorder — or a bus that has one (the ``event_recorder`` fixture) — events
    published before the call count too; given a bare bus, only those published after it
    (``bus.wait_for``):

    ```python
    await bus.publish(OrderPlaced("o-1", 9.5))
    receipt = await assert_published(bus, ReceiptSent, lambda e: e.order_id == "o-1")
    ```
    """
    recorder = (
        bus_or_recorder
        if isinstance(bus_or_recorder, EventRecorder)
        else _recorders.get(bus_or_recorder)
    )
    try:
        if recorder is not None:
            return await recorder.first(event_type, predicate, timeout)
        bus: EventBus = bus_or_recorder  # type: ignore[assignment]
        return await bus.wait_for(event_type, predicate, timeout)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None


async def assert_not_published(
    recorder: EventRecorder, event_type: Any, predicate: Callable[[Any], bool] | None = None,
    timeout: float | None = 5.0,
) -> None:
    """Drains the recorder's bus (so every handler has run), then raises ``AssertionError``
    if a matching event was recorded."""
    await recorder.bus.drain(timeout)
    found = [
        e for e in recorder.events
        if _matches(event_type, e) and (predicate is None or predicate(e))
    ]
    if found:
        raise AssertionError(f"{len(found)} {_name(event_type)} event(s) published: {found[:3]!r}")


async def assert_handled(
    bus_or_recorder: EventBus | EventRecorder, handler: Callable[..., Any], event: Any,
    timeout: float | None = 5.0,
) -> None:
    """Drains the bus (every handler has run), then raises ``AssertionError`` unless a call
    of ``handler`` with ``event`` (the same object, or an equal one) returned without
    raising. Needs ``record_calls(bus)`` before subscribing (the ``event_bus`` fixture):

    ```python
    await event_bus.publish(order)
    await assert_handled(event_bus, send_receipt, order)
    ```
    """
    bus = bus_or_recorder.bus if isinstance(bus_or_recorder, EventRecorder) else bus_or_recorder
    await bus.drain(timeout)
    calls = _call_log(bus).of(handler)
    if any(c.ok and (c.event is event or c.event == event) for c in calls):
        return
    seen = [
        (c.event, "ok" if c.ok else f"raised {type(c.error).__name__}: {c.error}")
        for c in calls
    ]
    raise AssertionError(
        f"{_name(handler)} did not handle {event!r}; its calls: {seen or 'none'}"
    )
