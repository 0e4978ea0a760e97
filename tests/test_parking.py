"""Parking keys behind dead letters (on_dead_letter="park"): later events of the key wait in
order behind the head until it is retried or discarded, per subscription, across restarts."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from _failures import (
    Job,
    Other,
    quiet_oxbus_logs,  # noqa: F401 - an autouse fixture
)
from oxbus import (
    EventBus,
)


async def _park_setup(
    make_bus: Any, mode: str = "park"
) -> tuple[EventBus, list[tuple[str, int]], dict[str, bool]]:
    bus = await make_bus(workers=2, ordered=True)
    seen: list[tuple[str, int]] = []
    state = {"broken": True}

    async def ledger(event: Job) -> None:
        if state["broken"] and event.key == "K" and event.n == 1:
            raise ValueError("K1 is poison")
        seen.append((event.key or "", event.n))

    bus.subscribe(Job, ledger, name="ledger", on_dead_letter=mode)
    for key, n in [("K", 1), ("K", 2), ("L", 1), ("K", 3), ("L", 2)]:
        await bus.publish(Job(n, key))
    await bus.drain()
    return bus, seen, state


async def test_park_sends_later_events_of_the_key_behind_the_dead_letter(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus)
    assert seen == [("L", 1), ("L", 2)]  # other keys proceed
    head, *parked = bus.dead_letters.list()
    assert (head.event.key, head.event.n, head.error_type) == ("K", 1, "ValueError")
    assert head.parked_behind is None
    assert [(p.event.key, p.event.n) for p in parked] == [("K", 2), ("K", 3)]
    for p in parked:
        assert p.error_type == "oxbus.Parked"
        assert p.parked_behind == head.id
        assert p.subscription == "ledger"
        assert head.id in p.error_message
    assert bus.get_statistics()["dead_lettered"] == 3


async def test_retrying_the_head_redispatches_it_then_the_parked_events_in_order(
    make_bus: Any,
) -> None:
    bus, seen, state = await _park_setup(make_bus)
    head = bus.dead_letters.list()[0]
    seen.clear()
    state["broken"] = False
    assert await bus.dead_letters.retry(head) == 3
    await bus.drain()
    assert seen == [("K", 1), ("K", 2), ("K", 3)]
    assert len(bus.dead_letters) == 0
    # The key is unparked: a new event of K is handled at once.
    await bus.publish(Job(4, "K"))
    await bus.drain()
    assert seen[-1] == ("K", 4) and len(bus.dead_letters) == 0


async def test_retrying_a_head_that_fails_again_parks_the_rest_again(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus)
    head = bus.dead_letters.list()[0]
    seen.clear()
    assert await bus.dead_letters.retry(head) == 3
    await bus.drain()
    assert seen == []
    new_head, *parked = bus.dead_letters.list()
    assert (new_head.event.n, new_head.error_type) == (1, "ValueError")
    assert [(p.event.n, p.parked_behind) for p in parked] == [(2, new_head.id), (3, new_head.id)]


async def test_retrying_the_head_keeps_the_order_when_the_key_was_given_to_publish(
    make_bus: Any,
) -> None:
    # The key comes from publish(key=...), not from the event: the retry must keep it.
    bus = await make_bus(workers=2, ordered=True)
    seen: list[int] = []
    broken = True

    async def ledger(event: Other) -> None:
        if broken and event.n == 1:
            raise ValueError("poison")
        if event.n == 1:
            # sleep-ok below: the head takes a moment: nothing behind it may overtake
            await asyncio.sleep(0.01)  # sleep-ok
        seen.append(event.n)

    bus.subscribe(Other, ledger, name="ledger", on_dead_letter="park")
    for n in (1, 2, 3):
        await bus.publish(Other(n), key="K")
    await bus.drain()
    head = bus.dead_letters.list()[0]
    assert [d.parked_behind for d in bus.dead_letters.list()] == [None, head.id, head.id]
    broken = False
    assert await bus.dead_letters.retry(head) == 3
    await bus.drain()
    assert seen == [1, 2, 3]


async def test_discarding_the_head_dispatches_the_parked_events_in_order(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus)
    head = bus.dead_letters.list()[0]
    seen.clear()
    assert bus.dead_letters.discard(head) == 3
    await bus.drain()
    assert seen == [("K", 2), ("K", 3)]  # K1 is dropped, never handled
    assert len(bus.dead_letters) == 0


async def test_events_published_while_parked_join_the_queue_behind_the_head(make_bus: Any) -> None:
    bus, seen, state = await _park_setup(make_bus)
    await bus.publish(Job(4, "K"))
    await bus.drain()
    assert [(d.event.n, d.error_type) for d in bus.dead_letters.list()] == [
        (1, "ValueError"),
        (2, "oxbus.Parked"),
        (3, "oxbus.Parked"),
        (4, "oxbus.Parked"),
    ]
    seen.clear()
    state["broken"] = False
    assert await bus.dead_letters.retry() == 4  # all: the head and its parked events, once each
    await bus.drain()
    assert seen == [("K", 1), ("K", 2), ("K", 3), ("K", 4)]


async def test_skip_the_default_lets_later_events_of_the_key_proceed(make_bus: Any) -> None:
    bus, seen, _ = await _park_setup(make_bus, mode="skip")
    assert sorted(seen) == [("K", 2), ("K", 3), ("L", 1), ("L", 2)]
    assert [k for k, _ in seen if k == "K"] == ["K", "K"]
    assert [n for k, n in seen if k == "K"] == [2, 3]  # still in order
    (dl,) = bus.dead_letters.list()
    assert (dl.event.n, dl.error_type, dl.parked_behind) == (1, "ValueError", None)


async def test_skip_is_the_default(make_bus: Any) -> None:
    bus = await make_bus(workers=2, ordered=True)
    seen: list[int] = []

    async def handle(event: Job) -> None:
        if event.n == 1:
            raise ValueError
        seen.append(event.n)

    bus.subscribe(Job, handle)
    for n in (1, 2, 3):
        await bus.publish(Job(n, "K"))
    await bus.drain()
    assert seen == [2, 3]


async def test_parking_is_per_subscription(make_bus: Any) -> None:
    bus = await make_bus(workers=2, ordered=True)
    seen: list[tuple[str, int]] = []

    async def parks(event: Job) -> None:
        if event.n == 1:
            raise ValueError
        seen.append(("parks", event.n))

    async def audit(event: Job) -> None:
        seen.append(("audit", event.n))

    bus.subscribe(Job, parks, on_dead_letter="park", name="parks")
    bus.subscribe(Job, audit, name="audit")
    for n in (1, 2, 3):
        await bus.publish(Job(n, "K"))
    await bus.drain()
    assert seen == [("audit", 1), ("audit", 2), ("audit", 3)]
    assert [d.subscription for d in bus.dead_letters.list()] == ["parks"] * 3


async def test_a_parked_key_stays_parked_across_a_durable_restart(tmp_path: Path) -> None:
    path = tmp_path / "park.db"
    seen: list[int] = []
    broken = True

    async def ledger(event: Job) -> None:
        if broken and event.n == 1:
            raise ValueError("poison")
        seen.append(event.n)

    bus = EventBus(store=path, workers=2, ordered=True)
    bus.subscribe(Job, ledger, name="ledger", on_dead_letter="park")
    await bus.start()
    for n in (1, 2):
        await bus.publish(Job(n, "K"))
    await bus.drain(timeout=10)
    await bus.stop()
    assert seen == []

    bus = EventBus(store=path, workers=2, ordered=True)
    bus.subscribe(Job, ledger, name="ledger", on_dead_letter="park")
    await bus.start()
    try:
        await bus.publish(Job(3, "K"))
        await bus.drain(timeout=10)
        # K is still parked behind its dead letter: 3 may not overtake 1 and 2.
        assert seen == []
        assert [d.event.n for d in bus.dead_letters.list()] == [1, 2, 3]
        broken = False
        head = bus.dead_letters.list()[0]
        assert await bus.dead_letters.retry(head) == 3
        await bus.drain(timeout=10)
        assert seen == [1, 2, 3]
    finally:
        await bus.stop()
