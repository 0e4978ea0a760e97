"""The sagas of one bus: the ``SagaManager`` holds the runners (``oxbus._saga_runtime``), where
instances are kept (a book), the deadline ``Timer``, the statistics, and the hook the failure
bookkeeping calls when the retry policy gives up on a saga step; ``Sagas`` is ``bus.sagas``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any, Protocol

from oxbus._oxbus import Envelope
from oxbus._saga_runtime import COUNTERS, Book, MemoryBook, Runner
from oxbus.errors import BusClosed, BusNotStarted, ConfigurationError, InvalidSaga
from oxbus.saga import STATES, SagaDef, SagaInstance, StepDef, define, target_label

__all__ = ["SagaManager", "Sagas", "Timer", "empty_statistics"]

logger = logging.getLogger("oxbus")


class Bus(Protocol):
    """What the sagas use of an ``oxbus.EventBus`` (spelled here, so this module does not
    import the bus, which imports it)."""

    _sagas: SagaManager | None
    _failures: Any
    _store: Any
    _core: Any

    @property
    def clock(self) -> Any: ...

    @property
    def is_running(self) -> bool: ...

    def subscribe(
        self,
        event_type: Any,
        handler: Callable[[Any], Any],
        *,
        name: str | None = ...,
        retry: Any = ...,
        timeout: float | None = ...,
    ) -> str: ...

    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool: ...

    def _spawn(self, aw: Awaitable[Any]) -> None: ...


class Timer:
    """The deadlines of a bus's sagas, on the bus's clock: one task sleeps until the earliest
    and fires what is due. Entries are checked against the instance when they fire, so a
    cancelled or replaced deadline needs no removal."""

    def __init__(self, clock: Any) -> None:
        self.now: Callable[[], float] = clock.time if clock is not None else time.time
        self._sleep: Callable[[float], Awaitable[Any]] = (
            clock.sleep if clock is not None else asyncio.sleep
        )
        self._heap: list[tuple[float, int, Runner, str, str]] = []
        self._seq = itertools.count()
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, due: float, runner: Runner, key: str, name: str) -> None:
        earliest = self._heap[0][0] if self._heap else math.inf
        heapq.heappush(self._heap, (due, next(self._seq), runner, key, name))
        if due < earliest and self._changed is not None:
            self._changed.set()

    def start(self) -> None:
        if self._task is None:
            self._changed = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="oxbus-saga-deadlines"
            )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._changed = None

    async def fire_due(self) -> int:
        """Fires every deadline due now; returns how many events were published."""
        fired = 0
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            due, _, runner, key, name = heapq.heappop(self._heap)
            try:
                fired += await runner.fire(key, name, due)
            except (BusClosed, BusNotStarted):
                heapq.heappush(self._heap, (due, next(self._seq), runner, key, name))
                raise
            except Exception:
                logger.exception("saga %s %s: deadline %s could not fire", runner.name, key, name)
        return fired

    async def _run(self) -> None:
        assert self._changed is not None
        changed = self._changed
        while True:
            try:
                await self.fire_due()
            except (BusClosed, BusNotStarted):
                return
            changed.clear()
            if not self._heap:
                await changed.wait()
                continue
            sleeper = asyncio.ensure_future(self._sleep(max(0.0, self._heap[0][0] - self.now())))
            waiter = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()


class SagaManager:
    """The sagas of one bus."""

    @classmethod
    def of(cls, bus: Bus) -> SagaManager:
        """The bus's manager, made (and hooked to its failure bookkeeping) on first use."""
        if bus._sagas is None:
            bus._sagas = cls(bus)
            bus._failures.on_give_up = bus._sagas.on_give_up
        return bus._sagas

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.runners: dict[str, Runner] = {}
        self.by_sub: dict[int, tuple[Runner, StepDef, str]] = {}
        self.timer = Timer(bus.clock)
        store = bus._store
        if store is not None:
            from oxbus._saga_store import DurableBook

            self.book: Book = DurableBook(store)
        else:
            self.book = MemoryBook()

    def register(self, cls: Any) -> SagaDef:
        sdef = define(cls)
        if sdef.name in self.runners:
            raise InvalidSaga(f"a saga named {sdef.name!r} is registered on this bus already")
        runner = Runner(self, sdef)
        names = []
        for s in sdef.steps:
            for t in s.targets:
                sub = f"{sdef.name}.{s.method}" + (
                    f"[{target_label(t)}]" if len(s.targets) > 1 else ""
                )
                if self.bus._core.has_name(sub):
                    raise InvalidSaga(
                        f"saga {sdef.name}: a subscription named {sub!r} exists already"
                    )
                names.append((s, t, sub))
        for s, t, sub in names:
            sid = self.bus.subscribe(
                t,
                runner.handler(s, t),
                name=sub,
                retry=sdef.cls.retry,
                timeout=sdef.cls.timeout,
            )
            self.by_sub[int(sid[4:])] = (runner, s, sub)
        self.runners[sdef.name] = runner
        if self.bus.is_running:
            self.bus._spawn(runner.ensure_loaded())
        return sdef

    async def start(self) -> None:
        for runner in list(self.runners.values()):
            await runner.ensure_loaded()
        self.timer.start()

    async def stop(self) -> None:
        await self.timer.stop()

    def on_give_up(
        self, sub_id: int
    ) -> Callable[[Envelope, BaseException], Awaitable[None]] | None:
        """The hook for a saga step's subscription, or None."""
        found = self.by_sub.get(sub_id)
        if found is None:
            return None
        runner, step, subscription = found
        store = self.bus._store

        async def gave_up(env: Envelope, error: BaseException) -> None:
            recorded = False
            try:
                recorded = await runner.gave_up(step, subscription, env, error)
            except Exception:
                logger.exception(
                    "saga %s: recording the failed step %s failed", runner.name, step.method
                )
            if not recorded and store is not None and env.position is not None:
                # No instance change carried the event's progress: a dead letter is not
                # delivered again after a restart.
                store._core.mark_done(subscription, env.position)

        return gave_up

    def ensure_running(self) -> None:
        self.bus._core.ensure_running()

    async def dispatch(
        self, events: list[tuple[Any, Any]], positions: list[int] | None, correlation_id: Any
    ) -> None:
        """Publishes events a saga change recorded (on a durable bus: committed already)."""
        if not events:
            return
        bus = self.bus
        if positions is None:
            for event, key in events:
                await bus.publish(event, key, correlation_id)
            return
        from oxbus.backends import admit

        core = bus._core
        for (event, key), position in zip(events, positions):
            waiter = core.publish(event, key, correlation_id, position)
            if waiter is not None:
                await admit(core, waiter)

    def statistics(self) -> dict[str, Any]:
        """The ``sagas_*`` totals of ``get_statistics()`` and ``by_saga``, the same per saga
        (without the prefix)."""
        by_saga: dict[str, dict[str, int]] = {}
        for name, r in self.runners.items():
            counts = {c: r.stats[c] for c in COUNTERS}
            counts["running"] = len(r.live)
            by_saga[name] = counts
        s = empty_statistics()
        for counts in by_saga.values():
            for c, n in counts.items():
                s[f"sagas_{c}"] += n
        s["by_saga"] = by_saga
        return s


def empty_statistics() -> dict[str, Any]:
    """The saga statistics of a bus without sagas."""
    s: dict[str, Any] = {f"sagas_{c}": 0 for c in (*COUNTERS, "running")}
    s["by_saga"] = {}
    return s


class Sagas:
    """``bus.sagas``: the bus's saga instances.

    ```python
    for inst in await bus.sagas.instances(OrderSaga, state="running"):
        print(inst.key, inst.step, inst.state)
    ```
    """

    def __init__(self, manager: SagaManager) -> None:
        self._manager = manager

    @property
    def names(self) -> list[str]:
        """The registered sagas, by name."""
        return list(self._manager.runners)

    def _runner(self, saga: Any) -> Runner:
        name = (vars(saga).get("name") or saga.__name__) if isinstance(saga, type) else saga
        runner = self._manager.runners.get(name) if isinstance(name, str) else None
        if runner is None:
            raise ConfigurationError(
                f"no saga {name!r} is registered on this bus (registered: {', '.join(self.names) or 'none'})"
            )
        return runner

    async def instances(self, saga: Any = None, state: str | None = None) -> list[SagaInstance]:
        """The instances of ``saga`` (a class or a name; None: every saga), of ``state``
        (``running``, ``completed``, ``compensated``, ``failed``; None: any), by key."""
        if state is not None and state not in STATES:
            raise ConfigurationError(f"state must be one of {', '.join(STATES)}, got {state!r}")
        runners = list(self._manager.runners.values()) if saga is None else [self._runner(saga)]
        out: list[SagaInstance] = []
        for r in runners:
            await r.ensure_loaded()
            found = await self._manager.book.instances(r, state)
            out.extend(sorted((i.view(r.name) for i in found), key=lambda v: v.key))
        return out

    async def get(self, saga: Any, key: Any) -> SagaInstance | None:
        """The instance of ``saga`` whose key is ``key``, or None."""
        r = self._runner(saga)
        await r.ensure_loaded()
        k = str(key.value if isinstance(key, Enum) else key)
        inst = r.live.get(k) or await self._manager.book.find(r, k)
        return None if inst is None else inst.view(r.name)

    async def fire_due(self) -> int:
        """Fires the deadlines due now on the bus's clock and returns how many events that
        published (the timer does it too; this lets a test that advanced a ``ManualClock``
        go on once they are published): ``clock.advance(1800); await bus.sagas.fire_due();
        await bus.drain()``."""
        return await self._manager.timer.fire_due()
