"""The subscription record, in the shape of the pure-Python bus oxbus replaces."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from oxbus.errors import InvalidSubscription


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
