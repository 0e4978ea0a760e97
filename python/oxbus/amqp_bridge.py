"""``AmqpBridge``: plain AMQP queues in and exchanges out of a bus (seed 002's RabbitMQ, for
systems that do not speak oxbus).

::

    bridge = oxbus.AmqpBridge(bus, "amqp://guest:guest@127.0.0.1:5672/%2f")
    bridge.subscribe_queue("inventory.changes", to=ChangeBatchQuantity)   # JSON -> class -> bus
    bridge.publish_to("shop", "line.allocated", Allocated)   # bus events -> JSON to an exchange
    async with bus, bridge:
        ...

Incoming messages are JSON objects; each becomes an instance of ``to`` (through the same
rebuilding as the event store: dataclasses, pydantic models, DomainEvents) or stays a dict, is
published on the bus, and is acknowledged once the bus accepted it (a message that arrives while
the bridge stops is delivered again by the broker). The queues belong to the other system: the
bridge declares nothing and fails at ``start()`` if one is missing. Outgoing messages are the
event's fields as a top-level JSON object, persistent, under publisher confirms: the forwarding
subscription finishes once the broker confirmed the message (and follows the bus's retry policy
when it cannot).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from oxbus._oxbus import AmqpBridgeCore, decode_json, encode_json
from oxbus.config import positive_int, seconds
from oxbus.errors import ConfigurationError, OxbusError
from oxbus.transports import redact

__all__ = ["AmqpBridge"]

logger = logging.getLogger("oxbus")


class AmqpBridge:
    """Maps AMQP queues into a bus and bus events out to exchanges."""

    def __init__(
        self,
        bus: Any,
        url: str,
        *,
        prefetch: int = 100,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
    ) -> None:
        if not isinstance(url, str) or not url.lower().startswith(("amqp://", "amqps://")):
            shown = redact(url) if isinstance(url, str) else url
            raise ConfigurationError(f"url must be an amqp:// (or amqps://) URL, got {shown!r}")
        prefetch = positive_int("prefetch", prefetch)
        if prefetch > 65535:
            raise ConfigurationError(f"prefetch must be at most 65535, got {prefetch!r}")
        self.bus, self.url, self.prefetch = bus, url, prefetch
        timeouts = (seconds("connect_timeout", connect_timeout),
                    seconds("publish_timeout", publish_timeout))
        if None in timeouts:
            raise ConfigurationError(f"timeouts must be numbers of seconds > 0, got {timeouts}")
        self.connect_timeout, self.publish_timeout = (float(t or 0) for t in timeouts)
        self._incoming: dict[str, type | None] = {}
        self._outgoing: list[tuple[str, str, Any, str]] = []
        self._core: AmqpBridgeCore | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"AmqpBridge({redact(self.url)!r}, queues={list(self._incoming)!r})"

    def subscribe_queue(self, queue: str, to: type | None = None) -> None:
        """Publishes on the bus every JSON message of ``queue`` (an existing queue), as a
        ``to`` instance (or the dict when ``to`` is None). Call before ``start()``."""
        if self._core is not None:
            raise OxbusError("subscribe_queue() must be called before the bridge starts")
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError(f"queue must be a non-empty str, got {queue!r}")
        self._incoming[queue] = to

    def publish_to(self, exchange: str, routing_key: str, event_type: Any) -> str:
        """Sends every bus event of ``event_type`` (class, type string, pattern) to
        ``exchange`` with ``routing_key``, as a JSON object of its fields; returns the bus
        subscription id. ``exchange=""`` is AMQP's default exchange (routing key = queue)."""
        if not isinstance(exchange, str):
            raise ConfigurationError(f"exchange must be a str, got {exchange!r}")
        if not isinstance(routing_key, str):
            raise ConfigurationError(f"routing_key must be a str, got {routing_key!r}")
        name = f"amqp-bridge->{exchange}/{routing_key}"

        async def forward(event: Any) -> None:
            if self._core is None:
                raise OxbusError(f"the bridge is not started: cannot publish to {exchange!r}")
            await self._core.publish(exchange, routing_key, encode_json(event))

        forward.__qualname__ = name
        sid: str = self.bus.subscribe(event_type, forward, name=name)
        self._outgoing.append((exchange, routing_key, event_type, sid))
        return sid

    async def start(self) -> None:
        """Connects and consumes (on the engine's runtime, not the loop thread). Idempotent."""
        if self._core is not None:
            return
        self._core = await AmqpBridgeCore.connect(
            self.url, list(self._incoming), self.prefetch, self.connect_timeout,
            self.publish_timeout,
        )
        self._core.set_target(asyncio.get_running_loop(), self._on_messages)

    def _on_messages(self) -> None:
        core = self._core
        if core is None:
            return
        for queue, body, receipt in core.take():
            try:
                data = decode_json(body)
                cls = self._incoming.get(queue)
                if cls is None:
                    event = data
                else:
                    from oxbus.registry import rebuild

                    event = rebuild(cls, data)
            except Exception:
                logger.exception("AMQP bridge: cannot decode a message of queue %r: %.200s",
                                 queue, body)
                core.ack(queue, receipt)  # it would fail on every delivery
                continue
            task = asyncio.get_running_loop().create_task(
                self._publish(core, queue, receipt, event)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish(self, core: AmqpBridgeCore, queue: str, receipt: str, event: Any) -> None:
        try:
            await self.bus.publish(event)
        except Exception:
            # Left unacknowledged: the broker delivers it again (after a reconnect or restart).
            logger.exception("AMQP bridge: the bus refused a message of queue %r", queue)
            return
        core.ack(queue, receipt)

    async def stop(self) -> None:
        """Finishes the publishes under way, then disconnects. Idempotent."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        core, self._core = self._core, None
        if core is not None:
            await core.stop()

    async def __aenter__(self) -> AmqpBridge:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
