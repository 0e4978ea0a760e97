"""``DomainEvent``: a base class for events that costs nothing it does not have to.

Its identity fields are *non-data descriptors*: the first read computes a default and stores
it in the instance ``__dict__``, and later reads are plain attribute reads. Because they are
non-data descriptors, a subclass may declare any of them as a dataclass field or set them in
``__init__`` (frozen dataclasses included).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Generic, TypeVar, overload

from oxbus._oxbus import new_event_id

__all__ = ["DomainEvent"]

T = TypeVar("T")


class _Default(Generic[T]):
    """A non-data descriptor: computes a default on first read and caches it on the instance."""

    def __init__(self, make: Callable[[Any], T]) -> None:
        self._make = make
        self._name = make.__name__
        self.__doc__ = make.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, obj: None, owner: type) -> _Default[T]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> T: ...
    def __get__(self, obj: object | None, owner: type) -> T | _Default[T]:
        if obj is None:
            return self
        value = self._make(obj)
        try:
            obj.__dict__[self._name] = value
        except AttributeError:  # __slots__ without __dict__: recompute each time
            pass
        return value


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


_IDENTITY = frozenset(
    {"event_id", "occurred_at", "event_type", "aggregate_id", "correlation_id", "causation_id"}
)


class DomainEvent:
    """Base class for domain events.

    Gives ``event_id`` (a time-ordered UUID string, version 7), ``occurred_at`` (UTC ``datetime``), ``event_type``
    (the class name unless overridden), ``aggregate_id`` (None unless overridden: the
    ordering key), ``event_version`` (class attribute, 1), ``version`` (its alias),
    ``correlation_id`` (the event's own id for a root event, inherited when published from a
    handler) and ``causation_id`` (the id of the event whose handler published it).

    Plain subclasses call ``super().__init__()``; ``@dataclass`` and
    ``@dataclass(frozen=True)`` subclasses need nothing (``DomainEvent`` defines no fields):

    ```python
    class OrderPlaced(DomainEvent):
        def __init__(self, order_id: str, amount: float):
            super().__init__()
            self.order_id, self.amount = order_id, amount

        @property
        def aggregate_id(self) -> str:
            return self.order_id
    ```
    """

    __oxbus_domain_event__: ClassVar[bool] = True
    event_version: ClassVar[int] = 1

    def __init__(
        self,
        *,
        event_id: str | None = None,
        occurred_at: datetime | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> None:
        d = self.__dict__
        d["_oxbus_ts"] = time.time()
        if event_id is not None:
            d["event_id"] = event_id
        if occurred_at is not None:
            d["occurred_at"] = occurred_at
        if correlation_id is not None:
            d["correlation_id"] = correlation_id
        if causation_id is not None:
            d["causation_id"] = causation_id

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every subclass is known to oxbus.registry (stored events come back as this class).
        super().__init_subclass__(**kwargs)
        from oxbus.registry import _auto_register  # imported here: registry loads after us

        _auto_register(cls)

    def __post_init__(self) -> None:
        # Dataclass subclasses: record the creation time as __init__ would.
        self.__dict__["_oxbus_ts"] = time.time()

    @_Default
    def event_id(self) -> str:
        """A unique id (a time-ordered UUIDv7 string: the log's index on it stays cheap), made on first read."""
        return new_event_id()

    @_Default
    def occurred_at(self) -> datetime:
        """When the event was created (UTC)."""
        return _utc(self.__dict__.get("_oxbus_ts") or time.time())

    @_Default
    def event_type(self) -> str:
        """The type key used for string subscriptions: the class name by default."""
        return type(self).__name__

    @_Default
    def aggregate_id(self) -> Any:
        """The ordering key: events with the same one are handled in publish order."""
        return None

    @_Default
    def correlation_id(self) -> str:
        """The id shared by a causal chain; a root event's is its own ``event_id``."""
        return self.event_id

    @_Default
    def causation_id(self) -> str | None:
        """The id of the event whose handler published this one."""
        return None

    @property
    def version(self) -> int:
        """Alias of ``event_version``."""
        return self.event_version

    def to_dict(self) -> dict[str, Any]:
        """The event's public fields and identity as a plain dict."""
        out: dict[str, Any] = {
            k: v for k, v in vars(self).items() if not k.startswith("_")
        }
        for name in ("event_id", "event_type", "occurred_at", "correlation_id", "causation_id"):
            out[name] = getattr(self, name)
        out["aggregate_id"] = self.aggregate_id
        out["event_version"] = self.event_version
        return out

    def __repr__(self) -> str:
        # Identity attributes appear in __dict__ once read (they are cached there): leave
        # them out, so the repr does not depend on what was read before.
        fields = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in _IDENTITY
        )
        return f"{type(self).__name__}({fields})"
