"""``RedisPubSubBridge``: plain Redis Pub/Sub channels in and out of a bus.

```python
bridge = RedisPubSubBridge(bus, "redis://localhost:6379/0")
bridge.subscribe_channel("change_batch_quantity", to=ChangeBatchQuantity)  # JSON -> class
bridge.publish_to("line_allocated", Allocated)          # bus events -> JSON on a channel
async with bus, bridge:
    ...
```

Incoming payloads are JSON objects; each becomes an instance of ``to`` (through the same
rebuilding as the event store: dataclasses, pydantic models, DomainEvents) or stays a dict, and
is published on the bus. Outgoing messages are the event's fields as a top-level JSON object.
Redis Pub/Sub itself delivers at most once: messages sent while the bridge is disconnected are
lost; use the Streams transport (``EventBus(transport=...)``) when that matters.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from oxbus._oxbus import BridgeCore, decode_json, encode_json
from oxbus.errors import ConfigurationError, OxbusError

__all__ = ["RedisPubSubBridge"]

logger = logging.getLogger("oxbus")


class RedisPubSubBridge:
    """Maps Redis Pub/Sub channels into a bus and bus events out to channels."""

    def __init__(self, bus: Any, url: str) -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigurationError(f"url must be a redis:// URL, got {url!r}")
        self.bus, self.url = bus, url
        self._incoming: dict[str, type | None] = {}
        self._outgoing: list[tuple[str, Any, str]] = []
        self._core: BridgeCore | None = None

    def subscribe_channel(self, channel: str, to: type | None = None) -> None:
        """Publishes on the bus every JSON message of ``channel``, as a ``to`` instance (or the
        dict when ``to`` is None). Call before ``start()``."""
        if self._core is not None:
            raise OxbusError("subscribe_channel() must be called before the bridge starts")
        if not isinstance(channel, str) or not channel:
            raise ConfigurationError(f"channel must be a non-empty str, got {channel!r}")
        self._incoming[channel] = to

    def publish_to(self, channel: str, event_type: Any) -> str:
        """Sends every bus event of ``event_type`` (class, type string, pattern) to
        ``channel`` as a JSON object of its fields; returns the bus subscription id."""
        if not isinstance(channel, str) or not channel:
            raise ConfigurationError(f"channel must be a non-empty str, got {channel!r}")

        def forward(event: Any) -> None:
            if self._core is None:
                raise OxbusError(f"the bridge is not started: cannot publish to {channel!r}")
            self._core.publish(channel, encode_json(event))

        forward.__qualname__ = f"bridge->{channel}"
        sid: str = self.bus.subscribe(event_type, forward, name=f"bridge->{channel}")
        self._outgoing.append((channel, event_type, sid))
        return sid

    async def start(self) -> None:
        """Connects and subscribes (on the engine's runtime, not the loop thread). Idempotent."""
        if self._core is not None:
            return
        self._core = await BridgeCore.connect(self.url, list(self._incoming))
        self._core.set_target(asyncio.get_running_loop(), self._on_messages)

    def _on_messages(self) -> None:
        core = self._core
        if core is None:
            return
        for channel, payload in core.take():
            try:
                data = decode_json(payload)
                cls = self._incoming.get(channel)
                if cls is None:
                    event = data
                else:
                    from oxbus.registry import rebuild

                    event = rebuild(cls, data)
                self.bus.publish_nowait(event)
            except Exception:
                logger.exception("bridge: cannot publish the message of channel %r: %.200s", channel, payload)

    async def stop(self) -> None:
        """Disconnects (on the engine's runtime, not the loop thread). Idempotent."""
        core, self._core = self._core, None
        if core is not None:
            await core.stop()

    async def __aenter__(self) -> RedisPubSubBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
