"""How a bus applies events to saga instances (the public face is ``oxbus.saga``): one
``Runner`` per registered saga class; its bus's ``SagaManager`` (``oxbus._saga_manager``) holds
the runners, the deadline timer and the statistics. Where instances are kept is a book:
``MemoryBook`` here, ``DurableBook`` (``oxbus._saga_store``) on a durable bus.

Invariants:

- one event at a time per instance: every change of an instance (a step, a give-up, a deadline
  firing) holds that key's lock from reading the instance to recording the change;
- a step runs on copies (``Effects``); the instance changes only once the change is recorded
  (on a durable bus: committed), so a step that raises, or a commit that fails, leaves it as
  it was;
- an event is applied to an instance at most once: its reference (event id; log position on a
  durable bus) is recorded with the change it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Protocol

from oxbus._oxbus import Envelope, current_envelope, decode_json, encode_json
from oxbus.errors import ConfigurationError, InvalidEvent, InvalidSaga
from oxbus.saga import Saga, SagaDef, SagaInstance, StepDef

__all__ = ["Applied", "Book", "Change", "Effects", "Instance", "MemoryBook", "Runner"]

logger = logging.getLogger("oxbus")

#: The counters ``get_statistics()`` shows.
COUNTERS = ("started", "completed", "compensated", "failed", "ignored", "duplicates")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def type_key_of(event: Any) -> str:
    """An event's type key, by the bus's rule."""
    if isinstance(event, dict):
        t = event.get("event_type")
    else:
        t = getattr(event, "event_type", None)
    if isinstance(t, Enum):
        t = t.value
    return t if isinstance(t, str) and t else type(event).__name__


#: The step an event is published for, outside the step's call (a deadline firing, a give-up):
#: (its subscription, the id of the event it handled); None inside the call.
Cause = tuple[str, str] | None


@dataclass
class Instance:
    """A saga instance as the runtime keeps it (see ``oxbus.SagaInstance`` for the view)."""

    key: str
    status: str = "running"
    step: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    compensations: list[Any] = field(default_factory=list)
    #: name -> (due on the clock, event, the step that set it: (subscription, event id))
    deadlines: dict[str, tuple[float, Any, Cause]] = field(default_factory=dict)
    applied: set[str] = field(default_factory=set)
    error: str | None = None
    correlation_id: str | None = None
    steps: int = 0
    compensated: bool = False
    started_at: datetime | None = None
    updated_at: datetime | None = None

    def view(self, saga: str) -> SagaInstance:
        return SagaInstance(
            saga=saga,
            key=self.key,
            status=self.status,
            step=self.step,
            state=decode_json(encode_json(self.state)),
            steps=self.steps,
            compensations=[type_key_of(e) for e in self.compensations],
            deadlines={n: d[0] for n, d in sorted(self.deadlines.items())},
            compensated=self.compensated,
            error=self.error,
            correlation_id=self.correlation_id,
            started_at=self.started_at,
            updated_at=self.updated_at,
        )


class Effects:
    """What one step does, recorded on copies and applied when it returns."""

    def __init__(self, runner: Runner, inst: Instance, cause: Cause = None) -> None:
        self._runner = runner
        self._cause = cause
        self.state: dict[str, Any] = decode_json(encode_json(inst.state))
        self.published: list[tuple[Any, Any]] = []
        self.compensations = list(inst.compensations)
        self.deadlines = dict(inst.deadlines)
        self.status: str | None = None
        self.error: str | None = None
        self.compensated = False

    def publish(self, event: Any, key: Any) -> None:
        self._runner.check_event(event, "publish")
        self.published.append((event, key))

    def on_failure(self, event: Any) -> None:
        self._runner.check_event(event, "on_failure", stored=True)
        self.compensations.append(event)

    def deadline(self, seconds: Any, event: Any, name: str | None) -> str:
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not (seconds >= 0 and math.isfinite(seconds))
        ):
            raise ConfigurationError(f"deadline seconds must be a number >= 0, got {seconds!r}")
        self._runner.check_event(event, "deadline", stored=True)
        if name is None:
            name = type_key_of(event)
        elif not isinstance(name, str) or not name:
            raise ConfigurationError(f"a deadline name must be a non-empty str, got {name!r}")
        due = self._runner.manager.timer.now() + float(seconds)
        self.deadlines[name] = (due, event, self._cause)
        return name

    def cancel_deadline(self, name: Any) -> bool:
        if isinstance(name, type):
            from oxbus.registry import type_key

            name = type_key(name)
        return self.deadlines.pop(name, None) is not None

    def compensate(self) -> None:
        for event in reversed(self.compensations):
            self.published.append((event, None))
        self.compensations = []
        self.compensated = True
        self.end("compensated", None)

    def end(self, status: str, error: str | None) -> None:
        self.status, self.error = status, error


class Clock(Protocol):
    """The deadline timer, as a runner uses it (``oxbus._saga_manager.Timer``)."""

    now: Callable[[], float]

    def add(self, due: float, runner: Runner, key: str, name: str) -> None: ...


class Manager(Protocol):
    """A bus's sagas, as a runner uses them (``oxbus._saga_manager.SagaManager``; spelled
    here so this module does not import it, which imports this one)."""

    @property
    def book(self) -> Book: ...

    @property
    def timer(self) -> Clock: ...

    def ensure_running(self) -> None:
        """Raises ``BusNotStarted`` / ``BusClosed`` when the bus takes no events."""

    async def dispatch(
        self, events: list[tuple[Any, Any]], positions: list[int] | None, correlation_id: Any
    ) -> None:
        """Publishes the events of a recorded change."""


class Book(Protocol):
    """Where a saga's instances are kept."""

    durable: bool

    async def load(self, runner: Runner) -> list[Instance]:
        """The running instances, with their applied references and deadlines."""

    async def find(self, runner: Runner, key: str) -> Instance | None:
        """An instance that is not running (or not loaded), or None."""

    async def commit(self, runner: Runner, change: Change) -> list[int] | None:
        """Records a change; returns the log positions of its events (None without a log).
        Raises ``Applied`` when its event was applied to the instance already."""

    async def instances(self, runner: Runner, state: str | None) -> list[Instance]:
        """Every instance (of ``state``)."""


@dataclass
class Change:
    """One change of an instance, recorded at once."""

    #: the instance after it
    after: Instance
    #: the event applied (None: a deadline fired)
    ref: str | None
    #: the events to publish: (event, ordering key)
    events: list[tuple[Any, Any]]
    #: the progress of the event applied: (subscription, log position)
    done: tuple[str, int] | None = None
    #: the correlation id of the events (None: the running handler's)
    correlation_id: Any = None
    cause: Cause = None


class Applied(Exception):
    """The event was applied to the instance already (found at commit)."""


class MemoryBook:
    """No store: ended instances stay in memory."""

    durable = False

    def __init__(self) -> None:
        self.ended: dict[tuple[str, str], Instance] = {}

    async def load(self, runner: Runner) -> list[Instance]:
        return []

    async def find(self, runner: Runner, key: str) -> Instance | None:
        return self.ended.get((runner.name, key))

    async def commit(self, runner: Runner, change: Change) -> list[int] | None:
        after = change.after
        if after.status != "running":
            self.ended[(runner.name, after.key)] = after
        return None

    async def instances(self, runner: Runner, state: str | None) -> list[Instance]:
        found = list(runner.live.values()) + [
            i for (s, _), i in self.ended.items() if s == runner.name
        ]
        return [i for i in found if state is None or i.status == state]


class _Locks:
    """One asyncio lock per key, kept while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def _ref(env: Envelope | None, event: Any) -> str:
    """What identifies an event for "applied at most once": its log position on a durable
    bus (a row has one, whatever the event's class keeps), else its event id."""
    if env is None:
        eid = (
            getattr(event, "event_id", None)
            if not isinstance(event, dict)
            else event.get("event_id")
        )
        return str(eid) if eid is not None else f"object:{id(event)}"
    if env.position is not None:
        return f"@{env.position}"
    return str(env.event_id)


class Runner:
    """One saga class on one bus."""

    def __init__(self, manager: Manager, sdef: SagaDef) -> None:
        self.manager = manager
        self.sdef = sdef
        self.name = sdef.name
        self.live: dict[str, Instance] = {}
        #: COUNTERS of this saga, since the bus was made
        self.stats: Counter[str] = Counter()
        self.lock = _Locks()
        self._loaded: asyncio.Future[None] | None = None
        self._class_targets = {t: s for s in sdef.steps for t in s.targets if isinstance(t, type)}
        self._str_targets = {t: s for s in sdef.steps for t in s.targets if isinstance(t, str)}

    # ------------------------------------------------------------------- routing

    def target_for(self, event: Any) -> Any:
        """The step target that takes ``event``: the most specific class, else its type key."""
        if not isinstance(event, dict):
            for klass in type(event).__mro__:
                if klass in self._class_targets:
                    return klass
        t = type_key_of(event)
        return t if t in self._str_targets else None

    def key_of(self, event: Any) -> str:
        field_ = self.sdef.key
        value = event.get(field_) if isinstance(event, dict) else getattr(event, field_, None)
        if isinstance(value, Enum):
            value = value.value
        if value is None:
            raise InvalidEvent(
                f"saga {self.name}: the {type_key_of(event)} event has no {field_!r} (the "
                "saga's key), so it names no instance"
            )
        if isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)):
            raise InvalidEvent(
                f"saga {self.name}: the key {field_!r} of a {type_key_of(event)} event must be "
                f"a str, int or UUID, got {value!r}"
            )
        return str(value)

    def check_event(self, event: Any, what: str, stored: bool = False) -> None:
        if event is None:
            raise InvalidEvent(f"saga {self.name}: {what}(None): give an event")
        if stored and self.manager.book.durable and not isinstance(event, dict):
            from oxbus.registry import lookup

            if lookup(type_key_of(event)) is None:
                raise InvalidSaga(
                    f"saga {self.name}: {what}({type(event).__qualname__}(...)) is stored with "
                    f"the instance, and {type_key_of(event)!r} is not a registered event type: "
                    "decorate the class with @oxbus.register_event (DomainEvent subclasses are "
                    "registered already) so a restart can rebuild it"
                )

    # ----------------------------------------------------------------- instances

    async def ensure_loaded(self) -> None:
        """Loads the running instances once (a durable bus; at start, or at the first event)."""
        if self._loaded is None:
            self._loaded = asyncio.get_running_loop().create_future()
            try:
                for inst in await self.manager.book.load(self):
                    self.live[inst.key] = inst
                    for name, (due, _, _) in inst.deadlines.items():
                        self.manager.timer.add(due, self, inst.key, name)
            except BaseException as e:
                fut, self._loaded = self._loaded, None
                fut.set_exception(e)
                fut.exception()  # retrieved: the next call tries again
                raise
            self._loaded.set_result(None)
        elif not self._loaded.done():
            await asyncio.shield(self._loaded)

    async def _find(self, key: str) -> Instance | None:
        inst = self.live.get(key)
        if inst is not None:
            return inst
        inst = await self.manager.book.find(self, key)
        if inst is not None and inst.status == "running":
            # Not loaded at start (another process wrote it): keep it, arm its deadlines.
            self.live[key] = inst
            for name, (due, _, _) in inst.deadlines.items():
                self.manager.timer.add(due, self, key, name)
        return inst

    def _bind(self, inst: Instance, fx: Effects) -> Saga:
        obj: Saga = object.__new__(self.sdef.cls)
        obj.state = fx.state
        obj.saga_id = inst.key
        obj.current_step = inst.step
        obj._oxbus_effects = fx
        return obj

    # ------------------------------------------------------------------ applying

    def handler(self, step: StepDef, target: Any) -> Callable[[Any], Awaitable[None]]:
        async def handle(event: Any) -> None:
            await self.apply(step, target, event)

        handle.__qualname__ = f"{self.name}.{step.method}"
        return handle

    async def apply(self, step: StepDef, target: Any, event: Any) -> None:
        if self.target_for(event) != target:
            return  # a step of a more specific type takes it, through its own subscription
        key = self.key_of(event)
        env = current_envelope()
        ref = _ref(env, event)
        await self.ensure_loaded()
        stats = self.stats
        async with self.lock(key):
            inst = await self._find(key)
            new = inst is None
            if inst is None:
                if not step.starts:
                    stats["ignored"] += 1
                    return
                inst = Instance(key, correlation_id=_text(env.correlation_id if env else None))
            elif ref in inst.applied:
                stats["duplicates"] += 1
                return
            elif inst.status != "running":
                stats["ignored"] += 1
                return
            sub = None if env is None else env.subscription
            fx = Effects(self, inst, None if sub is None else (sub, str(env.event_id)))  # type: ignore[union-attr]
            await step.fn(self._bind(inst, fx), event)
            done = None
            if env is not None and env.position is not None and sub is not None:
                done = (sub, env.position)
            await self._record(inst, new, fx, step.method, Change(inst, ref, fx.published, done))

    async def gave_up(
        self, step: StepDef, subscription: str, env: Envelope, error: BaseException
    ) -> bool:
        """The retry policy gave up on ``step`` for ``env``'s event: the instance's
        compensations are published and it ends failed with the error, recorded with the
        event's progress. False when there was no instance to fail (nothing recorded)."""
        event = env.event
        try:
            key = self.key_of(event)
        except InvalidEvent:
            return False  # it named no instance
        ref = _ref(env, event)
        cls = type(error)
        name = (
            cls.__qualname__
            if cls.__module__ == "builtins"
            else f"{cls.__module__}.{cls.__qualname__}"
        )
        async with self.lock(key):
            inst = await self._find(key)
            new = inst is None
            if inst is None:
                if not step.starts:
                    return False
                inst = Instance(key, correlation_id=_text(env.correlation_id))
            elif inst.status != "running" or ref in inst.applied:
                return False
            fx = Effects(self, inst)
            if fx.compensations:
                fx.compensate()
            fx.end("failed", f"{step.method}: {name}: {error}")
            done = None if env.position is None else (subscription, env.position)
            cause = (subscription, str(env.event_id))
            change = Change(inst, ref, fx.published, done, env.correlation_id, cause)
            await self._record(inst, new, fx, inst.step, change)
            logger.error(
                "saga %s %s failed in step %s: %s: %s%s",
                self.name,
                key,
                step.method,
                name,
                error,
                " (compensations published)" if fx.compensated else "",
            )
        return True

    async def _record(
        self, inst: Instance, new: bool, fx: Effects, step: str | None, change: Change
    ) -> None:
        """Records what a step did, then publishes its events. Once the commit is sent it
        is seen through even if the caller is cancelled (a step timeout, a stop), so the
        instance in memory never lags the file while this key's lock is free."""
        await _uncancelled(self._commit(inst, new, fx, step, change))

    async def _commit(
        self, inst: Instance, new: bool, fx: Effects, step: str | None, change: Change
    ) -> None:
        status = fx.status or "running"
        now = _now()
        # As a durable bus would store it (and refusing what it could not).
        state = decode_json(encode_json(fx.state))
        after = replace(
            inst,
            status=status,
            step=step,
            state=state,
            compensations=fx.compensations,
            deadlines=fx.deadlines if status == "running" else {},
            error=fx.error or inst.error,
            steps=inst.steps + 1,
            compensated=inst.compensated or fx.compensated,
            started_at=inst.started_at or now,
            updated_at=now,
            applied=inst.applied,
        )
        book = self.manager.book
        try:
            change.after = after
            positions = await book.commit(self, change)
        except Applied:
            # The file has it although this instance did not know: read it again next time.
            self.stats["duplicates"] += 1
            self.live.pop(inst.key, None)
            return
        inst_applied = inst.applied
        inst_applied.add(change.ref)  # type: ignore[arg-type]
        after.applied = inst_applied
        if status == "running":
            self.live[inst.key] = after
            for name, (due, _, _) in after.deadlines.items():
                if inst.deadlines.get(name, (None, None, None))[0] != due:
                    self.manager.timer.add(due, self, inst.key, name)
        else:
            self.live.pop(inst.key, None)
        stats = self.stats
        stats["started"] += new
        stats["compensated"] += fx.compensated
        if status in ("completed", "failed"):
            stats[status] += 1
        await self.manager.dispatch(fx.published, positions, change.correlation_id)

    async def fire(self, key: str, name: str, due: float) -> bool:
        """Publishes a deadline's event if it is still set for ``due``. Raises
        ``BusNotStarted`` / ``BusClosed`` (changing nothing) when the bus takes no events."""
        self.manager.ensure_running()
        async with self.lock(key):
            inst = self.live.get(key)
            entry = None if inst is None else inst.deadlines.get(name)
            if inst is None or entry is None or entry[0] != due:
                return False
            _, event, cause = entry
            remaining = {n: d for n, d in inst.deadlines.items() if n != name}
            after = replace(inst, deadlines=remaining)
            change = Change(after, None, [(event, None)], None, inst.correlation_id, cause)
            await _uncancelled(self._fired(change))
        return True

    async def _fired(self, change: Change) -> None:
        positions = await self.manager.book.commit(self, change)
        self.live[change.after.key] = change.after
        await self.manager.dispatch(change.events, positions, change.correlation_id)


async def _uncancelled(aw: Awaitable[None]) -> None:
    """Runs ``aw`` to its end even when the caller is cancelled meanwhile; then the caller's
    cancellation goes on (its ``CancelledError`` is raised)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise  # the work itself was cancelled (the loop is closing)
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _text(v: Any) -> str | None:
    return None if v is None else str(v)
