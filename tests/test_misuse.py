"""Misuse is refused at once with the offending value in the message; lifecycle calls are
forgiving (start and stop twice, stop before start)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from oxbus import BusClosed, DomainEvent, EventBus, EventBusFactory, InMemoryEventBus
from oxbus.errors import OxbusError


class MisuseEvent(DomainEvent):
    pass


@pytest.mark.parametrize("value", [42, "not a function", None, MisuseEvent()])
async def test_subscribing_a_non_callable_names_it(value: Any) -> None:
    bus = EventBus()
    with pytest.raises(TypeError) as info:
        bus.subscribe(MisuseEvent, value)
    assert repr(value) in str(info.value)
    assert bus.get_statistics()["subscription_count"] == 0


async def test_subscribing_to_something_that_is_not_a_type_names_it() -> None:
    bus = EventBus()

    async def handler(event: Any) -> None:
        pass

    with pytest.raises(TypeError) as info:
        bus.subscribe(12345, handler)
    assert "12345" in str(info.value)


async def test_publishing_none_is_refused_with_none_in_the_message(make_bus: Any) -> None:
    bus = await make_bus()
    with pytest.raises(TypeError) as info:
        await bus.publish(None)
    assert "None" in str(info.value)
    with pytest.raises(TypeError):
        bus.publish_nowait(None)
    assert bus.get_statistics()["events_published"] == 0


@pytest.mark.parametrize("value", [0, -1, "4", True, 2.5])
def test_bad_workers_values_are_refused_naming_the_value(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        EventBus(workers=value)
    assert repr(value) in str(info.value)
    assert "workers" in str(info.value)


@pytest.mark.parametrize("value", [0, -1, "4", True])
def test_bad_worker_count_values_are_refused_naming_the_value(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        InMemoryEventBus(worker_count=value)
    assert repr(value) in str(info.value)
    with pytest.raises((ValueError, TypeError)):
        EventBusFactory.create_in_memory_event_bus(worker_count=value)


@pytest.mark.parametrize("value", [-1, -1000, "10", True])
def test_bad_max_queue_size_is_refused_naming_the_value(value: Any) -> None:
    with pytest.raises((ValueError, TypeError)) as info:
        EventBus(max_queue_size=value)
    assert repr(value) in str(info.value)
    assert "max_queue_size" in str(info.value)


async def test_start_twice_is_fine_and_keeps_the_worker_count() -> None:
    bus = EventBus(workers=2)
    seen: list[int] = []

    async def handler(event: MisuseEvent) -> None:
        seen.append(1)

    bus.subscribe(MisuseEvent, handler)
    await bus.start()
    await bus.start()
    try:
        assert bus.get_statistics()["worker_count"] == 2
        await bus.publish(MisuseEvent())
        await bus.drain()
        assert seen == [1]  # one delivery, not one per start()
        workers = [t for t in asyncio.all_tasks() if "worker" in t.get_name()]
        assert len(workers) == 2
    finally:
        await bus.stop()


async def test_stop_twice_is_fine() -> None:
    bus = EventBus(workers=2)
    seen: list[int] = []
    bus.subscribe(MisuseEvent, lambda e: seen.append(1))
    await bus.start()
    await bus.publish(MisuseEvent())
    assert await bus.stop() == 0  # drained: nothing discarded
    assert await bus.stop() == 0  # a no-op
    assert seen == [1]
    assert not bus.is_running
    stats = bus.get_statistics()
    assert (stats["is_running"], stats["events_published"], stats["events_processed"]) == (
        False, 1, 1,
    )
    assert bus.get_health_status()["status"] == "stopped"
    with pytest.raises(BusClosed):
        await bus.publish(MisuseEvent())
    assert seen == [1]


async def test_stop_before_start_is_fine() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(MisuseEvent, lambda e: seen.append(1))
    assert await bus.stop() == 0
    assert not bus.is_running
    assert bus.get_health_status()["status"] == "stopped"
    # It closed nothing: the bus starts and works afterwards.
    await bus.start()
    try:
        await bus.publish(MisuseEvent())
        await bus.drain()
        assert seen == [1]
    finally:
        await bus.stop()


async def test_stop_leaves_no_worker_tasks_behind() -> None:
    before = set(asyncio.all_tasks())
    bus = EventBus(workers=4)
    await bus.start()
    await bus.stop()
    leftover = [t for t in asyncio.all_tasks() - before if not t.done()]
    assert leftover == []


async def test_drain_from_inside_a_handler_is_refused_instead_of_deadlocking(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    errors: list[BaseException] = []

    async def handler(event: MisuseEvent) -> None:
        try:
            await bus.drain(timeout=1)
        except Exception as e:  # noqa: BLE001 - we record what the bus raised
            errors.append(e)

    bus.subscribe(MisuseEvent, handler)
    await bus.publish(MisuseEvent())
    await bus.drain(timeout=5)
    assert len(errors) == 1
    # Refused at once (not a TimeoutError after 1 s), as a misuse of the bus's state: a
    # RuntimeError, like BusNotStarted and BusClosed, and an OxbusError.
    assert isinstance(errors[0], RuntimeError) and isinstance(errors[0], OxbusError)
    assert str(errors[0]) == (
        "drain() called from inside a handler (of MisuseEvent) would wait for that handler "
        "itself; call it from outside handlers"
    )
