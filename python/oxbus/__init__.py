"""oxbus: an asyncio event bus with a Rust engine.

Change one import and keep your handlers::

    from oxbus import EventBus, DomainEvent
"""

from oxbus import errors
from oxbus._oxbus import Envelope, RetryPolicy, __version__, current_envelope
from oxbus.bus import (
    CircuitBreaker,
    DeadLetter,
    DeadLetters,
    EventBus,
    EventBusFactory,
    EventBusManager,
    InMemoryEventBus,
    ProcessingResult,
)
from oxbus.errors import (
    BusClosed,
    BusNotStarted,
    ConcurrencyError,
    OxbusError,
    QueueFull,
    SerializationError,
    StorageError,
    TransportError,
)
from oxbus.bridge import RedisPubSubBridge
from oxbus.events import DomainEvent
from oxbus.heartbeat import Heartbeat, HeartbeatHandle
from oxbus.log import CorrelationFilter
from oxbus.registry import register_event
from oxbus.store import Snapshot, SqliteEventStore, StoredEvent
from oxbus.subscription import Subscription

__all__ = [
    "BusClosed",
    "BusNotStarted",
    "CircuitBreaker",
    "ConcurrencyError",
    "CorrelationFilter",
    "DeadLetter",
    "DeadLetters",
    "DomainEvent",
    "Envelope",
    "EventBus",
    "EventBusFactory",
    "EventBusManager",
    "Heartbeat",
    "HeartbeatHandle",
    "InMemoryEventBus",
    "OxbusError",
    "ProcessingResult",
    "QueueFull",
    "RedisPubSubBridge",
    "RetryPolicy",
    "SerializationError",
    "Snapshot",
    "SqliteEventStore",
    "StorageError",
    "StoredEvent",
    "Subscription",
    "TransportError",
    "__version__",
    "current_envelope",
    "errors",
    "register_event",
]
