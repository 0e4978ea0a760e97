"""Bad input gets a typed ``oxbus.errors`` exception naming the value (issue 11, item 9)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from oxbus import EventBus
from oxbus.errors import InvalidEvent, InvalidSubscription


class Tick:
    pass


class Exploding:
    @property
    def aggregate_id(self) -> str:
        raise LookupError("no account loaded")


async def test_a_priority_beyond_64_bits_is_refused_naming_it(make_bus: Any) -> None:
    bus = await make_bus()
    with pytest.raises(InvalidSubscription, match=r"priority must fit in 64 bits, got 10{30}"):
        bus.subscribe(Tick, lambda e: None, priority=10**30)


async def test_a_name_that_is_not_a_str_is_refused_naming_it(make_bus: Any) -> None:
    bus = await make_bus()
    with pytest.raises(InvalidSubscription, match=r"name must be a str, got 123 \(type int\)"):
        bus.subscribe(Tick, lambda e: None, name=123)  # type: ignore[arg-type]


async def test_a_lone_surrogate_in_a_type_key_is_refused_naming_it(make_bus: Any) -> None:
    bus = await make_bus()
    bus.subscribe("ok", lambda e: None)
    with pytest.raises(InvalidEvent, match=r"event_type '\\udcff-x' is not valid UTF-8"):
        await bus.publish({"event_type": "\udcff-x"})
    with pytest.raises(InvalidSubscription, match=r"cannot subscribe to '\\udcff': it is not valid UTF-8"):
        bus.subscribe("\udcff", lambda e: None)


@pytest.mark.parametrize("store", [False, True])
async def test_an_aggregate_id_that_raises_gives_invalid_event_with_the_cause(
    make_bus: Any, tmp_path: Any, store: bool
) -> None:
    bus = await make_bus(workers=2, store=str(tmp_path / "b.db") if store else None)
    bus.subscribe(Exploding, lambda e: None, name="h")
    with pytest.raises(
        InvalidEvent,
        match=r"reading aggregate_id of a Exploding event raised LookupError: no account",
    ) as e:
        await bus.publish(Exploding())
    assert isinstance(e.value.__cause__, LookupError)
    assert bus.get_statistics()["events_published"] == 0


async def test_a_handler_that_swallows_cancellation_cannot_hang_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(event: Tick) -> None:
        entered.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # swallowed: the worker can never end

    bus.subscribe(Tick, stubborn)
    await bus.start()
    await bus.publish(Tick())
    await entered.wait()
    try:
        with caplog.at_level(logging.ERROR, logger="oxbus"):
            stopping = asyncio.ensure_future(bus.stop(timeout=0.2))
            done, _ = await asyncio.wait([stopping], timeout=30)
        assert stopping in done, "stop(timeout=0.2) hung on a handler that ignores cancellation"
        assert stopping.result() == 1  # the abandoned call is counted
        assert "did not end after it was cancelled" in caplog.text
        assert not bus.is_running
    finally:
        release.set()  # let the abandoned handler finish so the loop closes cleanly
        await asyncio.sleep(0)  # sleep-ok: one turn for the released handler to return
