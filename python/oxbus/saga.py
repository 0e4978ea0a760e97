"""Sagas (process managers): a long-running process over several events, as one class whose
instances are found by a key, whose state survives a crash on a durable bus, with
compensations and deadlines.

```python
class OrderSaga(oxbus.Saga):
    key = "order_id"                                  # events find their instance by this field

    @oxbus.step(OrderPlaced, starts=True)
    async def placed(self, e):
        self.state["items"] = e.items
        await self.publish(ReserveStock(e.order_id, e.items))
        self.on_failure(ReleaseStock(e.order_id))     # a compensation, run in reverse order
        self.deadline(1800, PaymentTimedOut(e.order_id))

    @oxbus.step(PaymentFailed, PaymentTimedOut)
    async def failed(self, e):
        await self.compensate()                       # publishes the compensations, then ends

    @oxbus.step(Shipped)
    async def shipped(self, e):
        self.complete()

bus.register_saga(OrderSaga)
```

How an event is applied (see ``oxbus._saga_runtime``):

- Each step's event types are subscribed on the bus (subscription ``OrderSaga.placed``; a step
  of several types gets one subscription per type, ``OrderSaga.failed[PaymentTimedOut]``).
  The instance is the one whose key is the event's ``key`` field (an attribute, or a dict
  item). No instance: a ``starts=True`` step starts one, any other step ignores the event
  (counted in ``get_statistics()["sagas_ignored"]``). A finished instance ignores events.
- One event at a time per instance, in the order they reach it, whatever ``workers`` is.
  Events that share the saga's key as their ordering key (``aggregate_id``) reach it in
  publish order.
- A step runs on a copy of the instance: what it does (``state``, ``publish``,
  ``on_failure``, ``deadline``, ``complete``...) takes effect when it returns, all at once;
  on a durable bus in the same SQLite transaction as the events it publishes and the
  record that the event was handled. A step that raises changes nothing and is retried by
  the retry policy (the saga's ``retry``, else the bus's); when the policy gives up, the
  instance's compensations are published (last registered first), it ends ``failed`` with
  the error, and the event is a dead letter of the step's subscription.
- An event is applied to an instance at most once (by event id; on a durable bus by log
  position): a redelivered event is skipped.
- ``self.deadline(seconds, event)`` publishes ``event`` after ``seconds`` on the bus's clock
  (``oxbus.testing.ManualClock`` in tests) unless the instance has ended or the step that
  follows cancels it (``self.cancel_deadline(...)``). Deadlines are stored with the instance;
  one that passed while the process was down fires when the bus starts.

``await bus.sagas.instances(OrderSaga)`` lists instances; ``oxbus sagas events.db`` does from the
command line.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, ClassVar, Protocol, TypeVar

from oxbus._oxbus import RetryPolicy
from oxbus.errors import InvalidSaga

__all__ = ["STATES", "Saga", "SagaInstance", "step"]

F = TypeVar("F", bound=Callable[..., Any])

#: The states of an instance: ``running`` until a step ends it ``completed`` (``complete()``),
#: ``compensated`` (``compensate()``) or ``failed`` (``fail(reason)``, or a step the retry
#: policy gave up on).
STATES = ("running", "completed", "compensated", "failed")


class Effects(Protocol):
    """What a step's calls record (kept by the bus's saga runtime while the step runs)."""

    def publish(self, event: Any, key: Any) -> None: ...
    def on_failure(self, event: Any) -> None: ...
    def deadline(self, seconds: Any, event: Any, name: str | None) -> str: ...
    def cancel_deadline(self, name: Any) -> bool: ...
    def compensate(self) -> None: ...
    def end(self, status: str, error: str | None) -> None: ...


@dataclass(frozen=True)
class StepSpec:
    """What ``@oxbus.step(...)`` recorded on a method."""

    targets: tuple[Any, ...]
    starts: bool


def step(*event_types: Any, starts: bool = False) -> Callable[[F], F]:
    """Marks an ``async def`` method of a [`Saga`][oxbus.Saga] as the step that handles
    ``event_types`` (classes, their subclasses too, or exact type-key strings).

    ``starts=True``: an event whose key has no instance yet starts one; for the other steps
    it is ignored.

    ```python
    @oxbus.step(PaymentFailed, PaymentTimedOut)
    async def payment_failed(self, event): ...
    ```
    """

    def mark(fn: F) -> F:
        fn.__oxbus_step__ = StepSpec(tuple(event_types), bool(starts))  # type: ignore[attr-defined]
        return fn

    return mark


class Saga:
    """The base class of a saga: set ``key`` and decorate ``async def`` methods with
    [`oxbus.step`][oxbus.step]; register the class with
    [`bus.register_saga`][oxbus.EventBus.register_saga].

    Class settings: ``key`` (required: the event field that names the instance), ``name``
    (default: the class name; what the store and ``oxbus sagas`` know the saga by; keep it
    when the class is renamed), ``retry`` (a ``RetryPolicy`` for the steps; default: the
    bus's) and ``timeout`` (seconds per step call; default: the bus's ``handler_timeout``).

    Inside a step: ``self.state`` (a dict, JSON values only), ``self.saga_id`` (the key),
    ``self.current_step`` (the last step applied), ``await self.publish(event)``,
    ``self.on_failure(event)``, ``self.deadline(seconds, event)``,
    ``self.cancel_deadline(name)``, ``await self.compensate()``, ``self.complete()``,
    ``self.fail(reason)`` (the last of the three in a step decides how the instance ends).
    An instance object lives for one step: keep data in ``state``.
    """

    key: ClassVar[str]
    name: ClassVar[str | None] = None
    retry: ClassVar[RetryPolicy | None] = None
    timeout: ClassVar[float | None] = None

    # Set on the object a step runs on.
    state: dict[str, Any]
    saga_id: str
    current_step: str | None
    _oxbus_effects: Effects

    async def publish(self, event: Any, key: Any = None) -> bool:
        """Publishes ``event`` when the step returns (with the step's other effects, in one
        transaction on a durable bus); returns True. ``key``: the ordering key, as
        ``bus.publish``'s."""
        self._oxbus_effects.publish(event, key)
        return True

    def on_failure(self, event: Any) -> None:
        """Registers a compensation: ``event`` is published if the saga is compensated
        (``compensate()``, or a step the retry policy gave up on); compensations are
        published last registered first."""
        self._oxbus_effects.on_failure(event)

    def deadline(self, seconds: float, event: Any, *, name: str | None = None) -> str:
        """Publishes ``event`` after ``seconds`` on the bus's clock, unless the instance has
        ended by then or ``cancel_deadline(name)`` is called. ``name`` (default: the
        event's type key) identifies it: a deadline of the same name replaces it. Returns
        the name."""
        return self._oxbus_effects.deadline(seconds, event, name)

    def cancel_deadline(self, name: Any) -> bool:
        """Cancels the deadline ``name`` (a name, or an event class: its type key); returns
        whether there was one."""
        return self._oxbus_effects.cancel_deadline(name)

    async def compensate(self) -> None:
        """Publishes the compensations, last registered first, and ends the instance as
        ``compensated``."""
        self._oxbus_effects.compensate()

    def complete(self) -> None:
        """Ends the instance as ``completed``; its deadlines are cancelled."""
        self._oxbus_effects.end("completed", None)

    def fail(self, reason: str) -> None:
        """Ends the instance as ``failed`` with ``reason`` recorded (compensations are not
        published: call ``await self.compensate()`` first for that)."""
        self._oxbus_effects.end("failed", str(reason))


@dataclass(frozen=True)
class SagaInstance:
    """One saga instance, as ``bus.sagas.instances()`` and ``oxbus sagas`` show it.

    ``status`` is one of ``running``, ``completed``, ``compensated``, ``failed``;
    ``step`` the last step applied; ``steps`` how many events were applied; ``compensations``
    the type keys of the registered compensations (in registration order); ``deadlines``
    name -> due time (seconds on the bus's clock: ``time.time()``, or the ``ManualClock``'s);
    ``compensated`` whether the compensations were published; ``error`` the failure.
    """

    saga: str
    key: str
    status: str
    step: str | None
    state: dict[str, Any]
    steps: int
    compensations: list[str] = field(default_factory=list)
    deadlines: dict[str, float] = field(default_factory=dict)
    compensated: bool = False
    error: str | None = None
    correlation_id: str | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (times in ISO 8601)."""
        d = dict(self.__dict__)
        for k in ("started_at", "updated_at"):
            d[k] = None if d[k] is None else d[k].isoformat()
        return d


# ---------------------------------------------------------------------------- definitions


@dataclass(frozen=True)
class StepDef:
    """One step of a checked saga definition."""

    method: str
    fn: Callable[..., Any]
    targets: tuple[Any, ...]
    starts: bool


@dataclass(frozen=True)
class SagaDef:
    """A checked saga class: its name, key field and steps."""

    cls: type[Saga]
    name: str
    key: str
    steps: tuple[StepDef, ...]


def target_label(target: Any) -> str:
    """How a step target is named: a class's type key, a string as it is."""
    from oxbus.registry import type_key

    if isinstance(target, type):
        return type_key(target)
    return str(target)


def _check_target(qual: str, method: str, target: Any) -> Any:
    if isinstance(target, Enum):
        target = target.value
    if isinstance(target, type):
        return target
    if isinstance(target, str) and target:
        if any(w in ("*", "#") for w in target.split(".")):
            raise InvalidSaga(
                f"{qual}.{method}: a step takes event classes or exact type keys, "
                f"not the pattern {target!r}"
            )
        return target
    raise InvalidSaga(
        f"{qual}.{method}: a step takes event classes or type-key strings, got {target!r}"
    )


def define(cls: Any) -> SagaDef:
    """Checks a saga class and returns its definition; ``InvalidSaga`` names the problem."""
    if not (isinstance(cls, type) and issubclass(cls, Saga)) or cls is Saga:
        raise InvalidSaga(f"register_saga takes a subclass of oxbus.Saga, got {cls!r}")
    qual = cls.__qualname__.rsplit("<locals>.", 1)[-1]
    key = getattr(cls, "key", None)
    if not isinstance(key, str) or not key:
        raise InvalidSaga(
            f'{qual} has no key: set key = "<field>", the event field whose value names the '
            f"instance (got {key!r})"
        )
    name = vars(cls).get("name") or cls.__name__
    if not isinstance(name, str):
        raise InvalidSaga(f"{qual}.name must be a str, got {name!r}")
    retry = getattr(cls, "retry", None)
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidSaga(f"{qual}.retry must be a RetryPolicy, got {retry!r}")
    steps: list[StepDef] = []
    seen: dict[Any, str] = {}
    names = {n for klass in cls.__mro__ for n in vars(klass)}
    for method in sorted(names):
        fn = getattr(cls, method, None)
        spec = getattr(fn, "__oxbus_step__", None)
        if not isinstance(spec, StepSpec):
            continue
        if not inspect.iscoroutinefunction(fn):
            raise InvalidSaga(
                f"{qual}.{method} is a step but not an async def method: write "
                f"`async def {method}(self, event)`"
            )
        if not spec.targets:
            raise InvalidSaga(f"{qual}.{method}: @oxbus.step needs at least one event type")
        targets = tuple(_check_target(qual, method, t) for t in spec.targets)
        for t in targets:
            if t in seen:
                raise InvalidSaga(
                    f"{qual}: {target_label(t)} is taken by two steps, {seen[t]} and {method}; "
                    "an event type has one step"
                )
            seen[t] = method
        steps.append(StepDef(method, fn, targets, spec.starts))
    if not steps:
        raise InvalidSaga(f"{qual} has no steps: decorate async methods with @oxbus.step(...)")
    if not any(s.starts for s in steps):
        raise InvalidSaga(
            f"{qual} has no step with starts=True: no event could start an instance "
            f"(steps: {', '.join(s.method for s in steps)})"
        )
    # Methods in definition order (the order the class body gives), for listings.
    order = {n: i for i, n in enumerate(_definition_order(cls))}
    steps.sort(key=lambda s: order.get(s.method, len(order)))
    return SagaDef(cls, name, key, tuple(steps))


def _definition_order(cls: type) -> list[str]:
    out: list[str] = []
    for klass in reversed(cls.__mro__):
        for n in vars(klass):
            if n not in out:
                out.append(n)
    return out
