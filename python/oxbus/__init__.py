"""oxbus: an asyncio event bus with a Rust engine.

Change one import and keep your handlers:

```python
from oxbus import EventBus, DomainEvent
```
"""

from oxbus import errors
from oxbus._oxbus import Envelope, RetryPolicy, __version__, current_envelope
from oxbus.bus import EventBus
from oxbus.compat import EventBusFactory, EventBusManager, InMemoryEventBus, ProcessingResult
from oxbus.config import CircuitBreaker
from oxbus.dead_letters import DeadLetter, DeadLetters
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
from oxbus.amqp_bridge import AmqpBridge
from oxbus.bridge import RedisPubSubBridge
from oxbus.events import DomainEvent
from oxbus.heartbeat import Heartbeat, HeartbeatHandle
from oxbus.log import CorrelationFilter
from oxbus.registry import register_event
from oxbus.saga import Saga, SagaInstance, step
from oxbus.store import Snapshot, SqliteEventStore, StoredEvent
from oxbus.subscription import Subscription
from oxbus.transports import Broker, Memory, RabbitMQ, RedisStreams, Sqlite, Transport

__all__ = [
    "AmqpBridge",
    "BusClosed",
    "Broker",
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
    "Memory",
    "OxbusError",
    "ProcessingResult",
    "QueueFull",
    "RabbitMQ",
    "RedisPubSubBridge",
    "RedisStreams",
    "RetryPolicy",
    "Saga",
    "SagaInstance",
    "SerializationError",
    "Snapshot",
    "Sqlite",
    "SqliteEventStore",
    "StorageError",
    "StoredEvent",
    "Subscription",
    "Transport",
    "TransportError",
    "__version__",
    "current_envelope",
    "errors",
    "register_event",
    "step",
]
