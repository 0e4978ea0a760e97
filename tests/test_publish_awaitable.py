"""`bus.publish(e)` on an in-memory bus returns a native awaitable (``oxbus._oxbus.Publish``)
instead of a Python coroutine: it must behave as the coroutine of ``async def publish`` did."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import pytest

import oxbus
from oxbus import EventBus, QueueFull


class PaEvent:
    def __init__(self, n: int) -> None:
        self.n = n


async def _bus(make_bus: Any, seen: list[int], **kwargs: Any) -> EventBus:
    bus: EventBus = await make_bus(**kwargs)

    async def handler(event: PaEvent) -> None:
        seen.append(event.n)

    bus.subscribe(PaEvent, handler)
    return bus


async def test_a_publish_never_awaited_publishes_nothing_and_warns_like_a_coroutine(
    make_bus: Any,
) -> None:
    seen: list[int] = []
    bus = await _bus(make_bus, seen)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pending = bus.publish(PaEvent(1))
        del pending
        gc.collect()
    await bus.drain()
    assert seen == []
    assert bus.get_statistics()["events_published"] == 0
    assert [str(w.message) for w in caught] == ["coroutine 'EventBus.publish' was never awaited"]
    assert caught[0].category is RuntimeWarning


async def test_a_closed_publish_publishes_nothing_and_does_not_warn(make_bus: Any) -> None:
    seen: list[int] = []
    bus = await _bus(make_bus, seen)
    pending = bus.publish(PaEvent(1))
    pending.close()
    del pending
    gc.collect()  # filterwarnings = error: a warning here would fail the test
    await bus.drain()
    assert seen == []


async def test_an_exception_thrown_in_before_the_first_step_ends_it_unpublished(
    make_bus: Any,
) -> None:
    seen: list[int] = []
    bus = await _bus(make_bus, seen)
    pending = bus.publish(PaEvent(1))
    with pytest.raises(KeyError):
        pending.throw(KeyError("stop"))
    await bus.drain()
    assert seen == []
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        await pending


async def test_it_is_a_coroutine_to_asyncio_and_returns_true_once(make_bus: Any) -> None:
    seen: list[int] = []
    bus = await _bus(make_bus, seen)
    pending = bus.publish(PaEvent(1))
    assert asyncio.iscoroutine(pending)
    assert await pending is True
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        await pending
    assert await asyncio.wait_for(bus.publish(PaEvent(2)), 5) is True
    assert await asyncio.ensure_future(bus.publish(PaEvent(3))) is True
    await bus.drain()
    assert seen == [1, 2, 3]


async def test_send_and_stop_iteration_carry_true_as_a_coroutine_does(make_bus: Any) -> None:
    seen: list[int] = []
    bus = await _bus(make_bus, seen)
    pending = bus.publish(PaEvent(1))
    with pytest.raises(StopIteration) as stop:
        pending.send(None)
    assert stop.value.value is True
    with pytest.raises(TypeError, match="non-None"):
        bus.publish(PaEvent(2)).send(5)
    await bus.drain()
    assert seen == [1]


async def test_a_full_queue_makes_it_wait_and_a_cancelled_wait_publishes_nothing(
    make_bus: Any,
) -> None:
    seen: list[int] = []
    release = asyncio.Event()
    bus: EventBus = await make_bus(max_queue_size=1)

    async def slow(event: PaEvent) -> None:
        await release.wait()
        seen.append(event.n)

    bus.subscribe(PaEvent, slow)
    await bus.publish(PaEvent(0))
    await bus.publish(PaEvent(1))  # waits until the worker took event 0: the queue is full
    with pytest.raises(QueueFull):
        bus.publish_nowait(PaEvent(99))
    waiting = asyncio.create_task(bus.publish(PaEvent(2)))
    cancelled = asyncio.create_task(bus.publish(PaEvent(3)))
    await asyncio.sleep(0)  # sleep-ok: both tasks run their first step and block on room
    assert not waiting.done() and not cancelled.done()
    cancelled.cancel()
    release.set()
    assert await waiting is True
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await bus.drain()
    assert seen == [0, 1, 2]


async def test_a_subclass_that_overrides_publish_keeps_its_own(make_bus: Any) -> None:
    calls: list[int] = []

    class Audited(EventBus):
        async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool:
            calls.append(event.n)
            return await super().publish(event, key, correlation_id)

    seen: list[int] = []
    bus = await _bus(make_bus, seen, cls=Audited)
    assert await bus.publish(PaEvent(7)) is True
    await bus.drain()
    assert calls == [7] and seen == [7]


async def test_it_takes_key_and_correlation_id_by_position_or_keyword(make_bus: Any) -> None:
    bus: EventBus = await make_bus(workers=2)
    seen: list[tuple[int, Any, Any]] = []

    def handler(event: PaEvent) -> None:
        env = oxbus.current_envelope()
        assert env is not None
        seen.append((event.n, env.key, env.correlation_id))

    bus.subscribe(PaEvent, handler)
    assert await bus.publish(PaEvent(1), "k1", "c1") is True
    assert await bus.publish(PaEvent(2), key="k2", correlation_id="c2") is True
    assert await bus.publish(event=PaEvent(3), correlation_id="c3") is True
    assert await bus.publish(PaEvent(4), None, None) is True
    await bus.drain()
    assert [s[:2] for s in seen] == [(1, "k1"), (2, "k2"), (3, None), (4, None)]
    assert [s[2] for s in seen[:3]] == ["c1", "c2", "c3"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'priority'"):
        bus.publish(PaEvent(5), priority=1)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'event'"):
        bus.publish()
    with pytest.raises(TypeError, match="multiple values for argument 'key'"):
        bus.publish(PaEvent(6), "k", key="k")
    with pytest.raises(TypeError, match="from 1 to 3 positional arguments"):
        bus.publish(PaEvent(7), 1, 2, 3)
