"""The names of the pure-Python bus oxbus replaces, so its users change one import:

```python
from oxbus import InMemoryEventBus, EventBusFactory, EventBusManager, ProcessingResult

bus = EventBusFactory.create_in_memory_event_bus(worker_count=2)
async with EventBusManager(bus) as started:
    await started.publish(event)
```
"""

from __future__ import annotations

from typing import Any

from oxbus.bus import EventBus
from oxbus.dead_letters import ProcessingResult

__all__ = ["EventBusFactory", "EventBusManager", "InMemoryEventBus", "ProcessingResult"]


class InMemoryEventBus(EventBus):
    """The pure-Python bus's class name: ``InMemoryEventBus(worker_count=4)`` is
    ``EventBus(workers=4)``."""


class EventBusFactory:
    """The pure-Python bus's factory."""

    @staticmethod
    def create_in_memory_event_bus(worker_count: int = 1, **kwargs: Any) -> InMemoryEventBus:
        """An in-memory bus with ``worker_count`` workers."""
        return InMemoryEventBus(worker_count=worker_count, **kwargs)


class EventBusManager:
    """Starts a bus on entry and stops it (draining) on exit:

    ```python
    async with EventBusManager(bus) as started:
        await started.publish(event)
    ```
    """

    def __init__(self, event_bus: EventBus) -> None:
        self.event_bus = event_bus

    async def __aenter__(self) -> EventBus:
        await self.event_bus.start()
        return self.event_bus

    async def __aexit__(self, *exc: object) -> None:
        await self.event_bus.stop()
