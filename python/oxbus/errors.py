"""Every exception oxbus raises, rooted at [`OxbusError`][oxbus.errors.OxbusError].

Each also inherits the built-in exception that code written for the pure-Python bus
already catches: ``BusNotStarted`` is a ``RuntimeError``, ``QueueFull`` an
``asyncio.QueueFull``, bad arguments are ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

import asyncio

__all__ = [
    "BusClosed",
    "BusNotStarted",
    "ConcurrencyError",
    "ConfigurationError",
    "InvalidEvent",
    "InvalidSaga",
    "InvalidSubscription",
    "NotConsuming",
    "OxbusError",
    "QueueFull",
    "ReentrantCall",
    "SerializationError",
    "StorageError",
    "TransportError",
    "UndecodableEvent",
]


class OxbusError(Exception):
    """The root of every oxbus exception."""


class BusNotStarted(OxbusError, RuntimeError):
    """The bus was used before ``await bus.start()``."""


class BusClosed(OxbusError, RuntimeError):
    """The bus was stopped; it accepts no more events."""


class ReentrantCall(OxbusError, RuntimeError):
    """``drain()``, ``wait_for()`` or ``stop()`` was called from inside a handler, where it
    would wait for that handler itself."""


class QueueFull(OxbusError, asyncio.QueueFull):
    """``publish_nowait`` found ``max_queue_size`` events queued."""


class ConfigurationError(OxbusError, ValueError):
    """A constructor or policy setting is out of range; the message names it and its value."""


class NotConsuming(ConfigurationError):
    """``subscribe()`` on a broker bus that runs without reading its consumer group (it
    started with no subscription and ``consume=None``): the handler would never receive an
    event. Subscribe before ``start()``, or make the bus with ``consume=True``."""


class InvalidSaga(ConfigurationError):
    """``bus.register_saga(cls)`` refused a saga definition (no ``key``, no ``starts=True``
    step, a step that is not ``async def``, an event type taken by two steps, ...), or a saga
    step misused its instance (an event a durable bus could not store); the message names
    the saga and the problem."""


class InvalidEvent(OxbusError, TypeError):
    """The object cannot be published (``None``, an unhashable key, ...)."""


class InvalidSubscription(OxbusError, TypeError):
    """``subscribe`` got something it cannot use (a non-callable handler, a bad target)."""


class ConcurrencyError(OxbusError):
    """An append found the stream at another version than ``expected_version``."""


class SerializationError(OxbusError, TypeError):
    """An event cannot be encoded; the message names the field path and the type."""


class StorageError(OxbusError):
    """The SQLite store failed (file missing, read-only, locked, corrupt, disk full)."""


class UndecodableEvent(StorageError, ValueError):
    """A row of the log cannot be turned back into an event (data or metadata that is not
    valid JSON, a bad date, a number Python refuses, fields no upcaster fixes). The message
    names the position, the type and the decoding error; ``position`` and ``event_type``
    carry the first two."""

    def __init__(self, position: int, event_type: str, reason: str) -> None:
        super().__init__(f"the event at position {position} ({event_type}) cannot be decoded: {reason}")
        self.position = position
        self.event_type = event_type
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[int, str, str]]:
        return (type(self), (self.position, self.event_type, self.reason))


class TransportError(OxbusError, ConnectionError):
    """The transport (Redis) failed or timed out."""
