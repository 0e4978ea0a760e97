"""The subscription record, in the shape of the bus oxbus replaces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Subscription:
    """One ``subscribe()`` call, as ``get_failed_events()[i]["subscription"]`` shows it.

    ``subscription_id`` is what ``subscribe`` returned; ``event_type`` the target as given (a
    class, a type string or pattern, an Enum member); ``is_async`` whether the handler is a
    coroutine function; ``retry_count`` the retries after the first attempt; ``name`` the
    subscription's name (by default the handler's ``module.qualname``). A subscription rebuilt
    for a dead letter read back from the store, whose handler is not subscribed in this
    process, has ``handler`` and ``event_type`` None.

    >>> sub = bus.get_failed_events()[0]["subscription"]  # doctest: +SKIP
    >>> sub.handler, sub.priority, sub.retry_count  # doctest: +SKIP
    """

    subscription_id: str
    event_type: Any
    handler: Callable[[Any], Any] | None
    priority: int
    is_async: bool
    retry_count: int
    name: str
