"""The Redis Pub/Sub bridge: the Cosmic Python end-to-end flow (seed 004) against a real Redis."""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from _env import unavailable

from oxbus import DomainEvent, EventBus, RedisPubSubBridge
from oxbus.errors import ConfigurationError, OxbusError, TransportError

URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


if not _redis_up():
    unavailable("no Redis on 127.0.0.1:6379 (.ci/run starts it)", module=True)


@dataclass
class ChangeBatchQuantity:
    ref: str
    qty: int


@dataclass
class Allocated(DomainEvent):
    orderid: str
    sku: str
    qty: int
    batchref: str


async def test_a_json_message_on_one_channel_yields_the_resulting_event_on_another() -> None:
    tag = uuid.uuid4().hex[:8]
    bus = EventBus()

    async def change_quantity(cmd: ChangeBatchQuantity) -> None:
        await bus.publish(Allocated(orderid="order1", sku="RED-CHAIR", qty=cmd.qty, batchref=cmd.ref))

    bus.subscribe(ChangeBatchQuantity, change_quantity)
    bridge = RedisPubSubBridge(bus, URL)
    bridge.subscribe_channel(f"change_batch_quantity:{tag}", to=ChangeBatchQuantity)
    bridge.publish_to(f"line_allocated:{tag}", Allocated)

    # The "outside world": another bridge that listens on the output channel and sends input.
    outside = EventBus()
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    outside.subscribe("#", lambda e: got.done() or got.set_result(e))
    world = RedisPubSubBridge(outside, URL)
    world.subscribe_channel(f"line_allocated:{tag}")
    async with bus, bridge, outside, world:
        assert world._core is not None
        world._core.publish(f"change_batch_quantity:{tag}", '{"ref": "batch1", "qty": 5}')
        message = await asyncio.wait_for(got, 5)
    assert message == {"orderid": "order1", "sku": "RED-CHAIR", "qty": 5, "batchref": "batch1"}


async def test_bad_messages_are_logged_not_lost_silently(caplog: pytest.LogCaptureFixture) -> None:
    tag = uuid.uuid4().hex[:8]
    bus = EventBus()
    seen: list[Any] = []
    bus.subscribe(ChangeBatchQuantity, seen.append)
    bridge = RedisPubSubBridge(bus, URL)
    bridge.subscribe_channel(f"in:{tag}", to=ChangeBatchQuantity)
    good = bus.wait_for(ChangeBatchQuantity, timeout=5)
    async with bus, bridge:
        assert bridge._core is not None
        bridge._core.publish(f"in:{tag}", "not json")
        bridge._core.publish(f"in:{tag}", '{"ref": "b", "qty": 1}')
        await good
        await bus.drain()
    assert seen == [ChangeBatchQuantity("b", 1)]
    assert "cannot publish the message of channel" in caplog.text


async def test_misuse_gets_clear_errors() -> None:
    with pytest.raises(ConfigurationError, match="redis://"):
        RedisPubSubBridge(EventBus(), "http://nope")
    bridge = RedisPubSubBridge(EventBus(), "redis://127.0.0.1:1/0")
    bridge.subscribe_channel("x")
    with pytest.raises(TransportError, match="127.0.0.1:1"):
        await bridge.start()
    ok = RedisPubSubBridge(EventBus(), URL)
    async with ok:
        with pytest.raises(OxbusError, match="before the bridge starts"):
            ok.subscribe_channel("late")
