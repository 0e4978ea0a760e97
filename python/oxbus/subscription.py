"""The subscription record, in the shape of the pure-Python bus oxbus replaces, and the checks
of ``subscribe()``'s options."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from oxbus._oxbus import RetryPolicy
from oxbus.config import CircuitBreaker
from oxbus.errors import ConfigurationError, InvalidSubscription


def qualname(obj: Any) -> str:
    """A handler's ``module.qualname``: a subscription's default name."""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        name = type(obj).__qualname__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module and module not in ("builtins", "__main__") else name


def check_takes_one_event(handler: Any) -> None:
    """Raises ``InvalidSubscription`` unless ``handler(event)`` binds: one positional
    argument, no other required one. A callable without a signature (some builtins) passes."""
    try:
        sig = inspect.signature(handler)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None)
    except TypeError as e:
        raise InvalidSubscription(
            f"handler {qualname(handler)}{sig} cannot be called with the event as its one "
            f"positional argument ({e})"
        ) from None


def check_options(
    handler: Any,
    priority: Any,
    name: Any,
    retry_count: Any,
    retry: Any,
    base: RetryPolicy,
    on_dead_letter: Any,
    circuit_breaker: Any,
) -> tuple[RetryPolicy | None, str]:
    """Checks ``subscribe()``'s handler and options, raising ``InvalidSubscription`` or
    ``ConfigurationError`` that names the bad value; returns the subscription's own retry
    policy (``retry_count=N`` is ``base`` with ``N + 1`` attempts; None: the bus's) and its
    name (by default the handler's ``module.qualname``)."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidSubscription(f"priority must be an int, got {priority!r}")
    if not -(2**63) <= priority < 2**63:
        raise InvalidSubscription(f"priority must fit in 64 bits, got {priority!r}")
    if name is not None and not isinstance(name, str):
        raise InvalidSubscription(f"name must be a str, got {name!r} (type {type(name).__name__})")
    if retry_count is not None and retry is not None:
        raise ConfigurationError("give retry_count or retry, not both")
    if retry_count is not None:
        if isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0:
            raise ConfigurationError(f"retry_count must be an int >= 0, got {retry_count!r}")
        b = base
        retry = RetryPolicy(
            retry_count + 1, b.base_delay, b.max_delay, b.multiplier, b.jitter, b.retry_on
        )
    if retry is not None and not isinstance(retry, RetryPolicy):
        raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
    if not callable(handler):
        raise InvalidSubscription(
            f"handler must be callable, got {handler!r} (type {type(handler).__name__})"
        )
    if inspect.isasyncgenfunction(handler) or inspect.isgeneratorfunction(handler):
        raise InvalidSubscription(
            f"handler {qualname(handler)} is a generator function: calling it would not "
            "run its body; use `def` or `async def` without `yield`"
        )
    check_takes_one_event(handler)
    if on_dead_letter not in ("skip", "park"):
        raise ConfigurationError(f"on_dead_letter must be 'skip' or 'park', got {on_dead_letter!r}")
    if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
        raise ConfigurationError(
            f"circuit_breaker must be a CircuitBreaker, got {circuit_breaker!r}"
        )
    return retry, name if name is not None else qualname(handler)


def is_async(handler: Any) -> bool:
    """Whether calling ``handler`` returns a coroutine (``functools.partial`` seen through)."""
    target = handler
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)
    )


@dataclass(frozen=True)
class Subscription:
    """One ``subscribe()`` call, as ``get_failed_events()[i]["subscription"]`` shows it.

    ``subscription_id`` is what ``subscribe`` returned; ``event_type`` the target as given (a
    class, a type string or pattern, an Enum member); ``is_async`` whether the handler is a
    coroutine function; ``retry_count`` the retries after the first attempt; ``name`` the
    subscription's name (by default the handler's ``module.qualname``). A subscription rebuilt
    for a dead letter read back from the store, whose handler is not subscribed in this
    process, has ``handler`` and ``event_type`` None.

    ```python
    sub = bus.get_failed_events()[0]["subscription"]
    sub.handler, sub.priority, sub.retry_count
    ```
    """

    subscription_id: str
    event_type: Any
    handler: Callable[[Any], Any] | None
    priority: int
    is_async: bool
    retry_count: int
    name: str
