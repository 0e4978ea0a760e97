"""Heartbeats (seed 003): ``bus.broadcast_heartbeat(source, interval)`` publishes
``oxbus.Heartbeat`` events on the bus's clock; health lists the last one seen per source and
marks a source stale after 1.5 intervals without one. Time is a ``ManualClock``: no sleeps."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import oxbus
from oxbus import BusNotStarted, Heartbeat, SqliteEventStore
from oxbus.errors import ConfigurationError
from oxbus.heartbeat import watch
from oxbus.testing import EventRecorder, ManualClock


async def started(make_bus: Any, **kwargs: Any) -> tuple[Any, ManualClock, EventRecorder]:
    clock = ManualClock(start=100.0)
    bus = await make_bus(clock=clock, **kwargs)
    return bus, clock, EventRecorder(bus)


def beat_of(source: str, sequence: int) -> Any:
    return lambda e: e.source == source and e.sequence == sequence


async def test_a_heartbeat_is_published_at_once_and_then_every_interval(make_bus: Any) -> None:
    bus, clock, rec = await started(make_bus)
    handle = await bus.broadcast_heartbeat("pricing", interval=5.0)
    first = rec.of_type(Heartbeat)[0]  # published before broadcast_heartbeat returned
    assert (first.source, first.sequence, first.interval) == ("pricing", 1, 5.0)
    assert first.sent_at.tzinfo is timezone.utc
    assert first.event_type == "oxbus.heartbeat" and first.aggregate_id == "pricing"

    clock.advance(4.9)
    await bus.drain()
    assert [h.sequence for h in rec.of_type(Heartbeat)] == [1]
    clock.advance(0.1)
    await rec.first(Heartbeat, beat_of("pricing", 2))
    clock.advance(5.0)
    await rec.first(Heartbeat, beat_of("pricing", 3))
    assert handle.sequence == 3 and handle.running
    assert [h.sequence for h in rec.of_type("oxbus.heartbeat")] == [1, 2, 3]
    handle.cancel()
    await handle.wait_closed()
    assert not handle.running


async def test_health_lists_the_last_heartbeat_per_source(make_bus: Any) -> None:
    bus, clock, rec = await started(make_bus)
    assert bus.get_health_status()["heartbeats"] == {}
    before = datetime.now(timezone.utc)
    await bus.broadcast_heartbeat("pricing", interval=5.0)
    await bus.broadcast_heartbeat("orders", interval=1.0)
    await bus.drain()
    beats = bus.get_health_status()["heartbeats"]
    assert sorted(beats) == ["orders", "pricing"]
    pricing = beats["pricing"]
    assert isinstance(pricing["last_seen"], datetime) and pricing["last_seen"] >= before
    assert pricing["age_seconds"] == 0.0
    assert pricing["stale"] is False
    assert (pricing["interval"], pricing["sequence"]) == (5.0, 1)

    for sequence in (2, 3, 4):  # orders beats at 101, 102, 103; pricing's last is at 100
        clock.advance(1.0)
        await rec.first(Heartbeat, beat_of("orders", sequence))
    await bus.drain()
    beats = bus.get_health_status()["heartbeats"]
    assert beats["pricing"]["age_seconds"] == 3.0 and not beats["pricing"]["stale"]
    assert beats["orders"]["age_seconds"] == 0.0 and beats["orders"]["sequence"] == 4


async def test_a_source_turns_stale_after_one_and_a_half_intervals_without_a_heartbeat(
    make_bus: Any,
) -> None:
    bus, clock, _ = await started(make_bus)
    handle = await bus.broadcast_heartbeat("pricing", interval=2.0)
    await bus.drain()
    handle.cancel()  # the source goes quiet, as a dead process would
    await handle.wait_closed()
    clock.advance(3.0)  # exactly 1.5 intervals: not yet
    assert bus.get_health_status()["heartbeats"]["pricing"]["stale"] is False
    clock.advance(0.01)
    seen = bus.get_health_status()["heartbeats"]["pricing"]
    assert seen["stale"] is True
    assert seen["age_seconds"] == pytest.approx(3.01)
    assert seen["sequence"] == 1


async def test_a_watching_bus_lists_heartbeats_it_did_not_send(make_bus: Any) -> None:
    # As another process's heartbeats arrive over a transport: the interval travels in the event.
    bus, clock, _ = await started(make_bus)
    watch(bus)
    await bus.publish(Heartbeat("worker-7", 12, datetime.now(timezone.utc), 10.0))
    await bus.drain()
    seen = bus.get_health_status()["heartbeats"]["worker-7"]
    assert (seen["sequence"], seen["interval"], seen["stale"]) == (12, 10.0, False)
    clock.advance(15.5)
    assert bus.get_health_status()["heartbeats"]["worker-7"]["stale"] is True
    # a heartbeat again: fresh
    await bus.publish(Heartbeat("worker-7", 13, datetime.now(timezone.utc), 10.0))
    await bus.drain()
    seen = bus.get_health_status()["heartbeats"]["worker-7"]
    assert (seen["sequence"], seen["stale"], seen["age_seconds"]) == (13, False, 0.0)


async def test_stopping_the_bus_ends_its_broadcasts(make_bus: Any) -> None:
    bus, clock, rec = await started(make_bus, workers=2)
    a = await bus.broadcast_heartbeat("a", interval=1.0)
    b = await bus.broadcast_heartbeat("b", interval=3.0)
    await bus.stop()
    assert not a.running and not b.running
    assert clock.sleepers == 0
    clock.advance(10.0)
    await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
    assert len(rec.of_type(Heartbeat)) == 2


async def test_cancel_stops_one_source_and_the_source_can_start_again(make_bus: Any) -> None:
    bus, clock, rec = await started(make_bus)
    handle = await bus.broadcast_heartbeat("pricing", interval=1.0)
    with pytest.raises(ConfigurationError, match="already broadcasts"):
        await bus.broadcast_heartbeat("pricing", interval=1.0)
    handle.cancel()
    handle.cancel()  # idempotent
    await handle.wait_closed()
    clock.advance(5.0)
    await bus.drain()
    assert [h.sequence for h in rec.of_type(Heartbeat)] == [1]
    again = await bus.broadcast_heartbeat("pricing", interval=1.0)
    assert again.sequence == 1 and again.running


async def test_bad_arguments_and_a_bus_not_started_are_refused(make_bus: Any) -> None:
    bus = await make_bus()
    for interval in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(ConfigurationError, match="interval"):
            await bus.broadcast_heartbeat("x", interval)
    with pytest.raises(ConfigurationError, match="source"):
        await bus.broadcast_heartbeat("", 1.0)
    idle = oxbus.EventBus()
    with pytest.raises(BusNotStarted):
        await idle.broadcast_heartbeat("x", 1.0)


async def test_user_handlers_see_heartbeats_by_class_and_by_type_string(make_bus: Any) -> None:
    bus, _, _ = await started(make_bus)
    seen: list[tuple[str, int]] = []

    async def by_class(beat: Heartbeat) -> None:
        seen.append(("class", beat.sequence))

    def by_string(beat: Heartbeat) -> None:
        seen.append(("string", beat.sequence))

    bus.subscribe(Heartbeat, by_class)
    bus.subscribe("oxbus.*", by_string)
    handle = await bus.broadcast_heartbeat("pricing", interval=1.0)
    await bus.drain()
    assert seen == [("class", 1), ("string", 1)]
    handle.cancel()


async def test_heartbeats_show_in_metrics(make_bus: Any) -> None:
    bus, clock, _ = await started(make_bus)
    handle = await bus.broadcast_heartbeat("pricing", interval=2.0)
    await bus.drain()
    handle.cancel()
    clock.advance(4.0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(bus.metrics())
        for s in f.samples
    }
    assert samples[("oxbus_heartbeat_age_seconds", (("bus", "oxbus"), ("source", "pricing")))] == 4.0
    assert samples[("oxbus_heartbeat_stale", (("bus", "oxbus"), ("source", "pricing")))] == 1.0
    assert samples[("oxbus_events_published_total", (("bus", "oxbus"), ("event_type", "oxbus.heartbeat")))] == 1


async def test_a_stored_heartbeat_comes_back_as_a_heartbeat() -> None:
    # What crosses a process boundary is the JSON form: it must rebuild the class.
    beat = Heartbeat("pricing", 3, datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc), 2.5)
    async with SqliteEventStore(":memory:") as store:
        await store.append("hb", [beat], expected_version=0)
        (stored,) = await store.read("hb")
    assert stored.event_type == "oxbus.heartbeat"
    again = stored.event
    assert isinstance(again, Heartbeat)
    assert (again.source, again.sequence, again.sent_at, again.interval) == (
        "pricing", 3, beat.sent_at, 2.5,
    )


async def test_after_a_stall_one_heartbeat_goes_out_not_a_burst(make_bus: Any) -> None:
    bus, clock, rec = await started(make_bus)
    handle = await bus.broadcast_heartbeat("pricing", interval=1.0)
    await bus.drain()
    clock.advance(10.0)  # ten intervals pass at once
    await rec.first(Heartbeat, beat_of("pricing", 2))
    await bus.drain()
    clock.advance(0.9)
    await bus.drain()
    assert [h.sequence for h in rec.of_type(Heartbeat)] == [1, 2]
    clock.advance(0.1)  # the schedule restarted from the stall: next due at 111
    await rec.first(Heartbeat, beat_of("pricing", 3))
    handle.cancel()
