"""Sagas on a durable bus (issue 16): instances live in the bus's SQLite file, written in the
same transaction as the events their steps publish and the progress of the event applied;
a restart resumes every instance, fires the deadlines that passed meanwhile, and never applies
an event twice."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import oxbus
import pytest
from _saga import (
    PAYMENT_TIMEOUT,
    Services,
    SgInventoryInsufficient,
    SgInventoryReserved,
    SgOrderCreated,
    SgOrderSaga,
    SgPaymentProcessed,
    order,
)
from oxbus import EventBus, RetryPolicy
from oxbus.errors import InvalidSaga
from oxbus.testing import ManualClock


def _bus(db: Path, services: Services, **kwargs: Any) -> EventBus:
    bus = EventBus(store=str(db), **kwargs)
    bus.register_saga(SgOrderSaga)
    services.attach(bus)
    return bus


def _sql(db: Path, query: str, *args: Any) -> list[tuple[Any, ...]]:
    """Reads the file of a stopped bus."""
    con = sqlite3.connect(db)
    try:
        return list(con.execute(query, args))
    finally:
        con.close()


async def test_instances_resume_where_they_were_after_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "sagas.db"
    first = Services(silent=("inventory",))
    async with _bus(db, first, workers=4) as bus:
        await bus.publish(order("o-1", total=10.0))
        await bus.publish(order("o-2", total=20.0))
        await bus.drain(timeout=10)
    assert first.names() == ["SgProcessPayment"] * 2 + ["SgReserveInventory"] * 2

    second = Services()
    async with _bus(db, second, workers=4) as bus:
        [o1, o2] = await bus.sagas.instances(SgOrderSaga, state="running")
        assert (o1.key, o1.step, o1.steps) == ("o-1", "payment_processed", 2)
        assert o1.state == {"items": ["book", "pen"], "total": 10.0, "payment_id": "pay-o-1"}
        assert o2.compensations == ["SgCancelOrder", "SgRefundPayment"]
        await bus.publish(SgInventoryReserved("o-1", reservation_id="res-1"))
        await bus.publish(SgInventoryInsufficient("o-2"))
        await bus.drain(timeout=10)
        o1 = await bus.sagas.get(SgOrderSaga, "o-1")  # type: ignore[assignment]
        o2 = await bus.sagas.get(SgOrderSaga, "o-2")  # type: ignore[assignment]
        assert (o1.status, o1.state["tracking"]) == ("completed", "trk-o-1")
        assert (o2.status, o2.compensated) == ("compensated", True)
    # The compensations came back from the file as the classes, with their fields.
    refund, cancel = [e for e in second.seen if e.order_id == "o-2"]
    assert (type(refund).__name__, refund.payment_id) == ("SgRefundPayment", "pay-o-2")
    assert type(cancel).__name__ == "SgCancelOrder"


async def test_a_deadline_that_passed_while_the_bus_was_down_fires_at_start(tmp_path: Path) -> None:
    db = tmp_path / "deadline.db"
    async with _bus(db, Services(silent=("payment",)), clock=ManualClock()) as bus:
        await bus.publish(order("late"))
        await bus.drain(timeout=10)
        assert (await bus.sagas.get(SgOrderSaga, "late")).deadlines == {  # type: ignore[union-attr]
            "SgPaymentTimedOut": PAYMENT_TIMEOUT
        }

    # Back up before it is due: it waits.
    async with _bus(db, Services(), clock=ManualClock(start=600)) as bus:
        assert await bus.sagas.fire_due() == 0
        inst = await bus.sagas.get(SgOrderSaga, "late")
        assert inst is not None and inst.status == "running"

    # Back up after it was due: it fires at start.
    services = Services()
    async with _bus(db, services, clock=ManualClock(start=PAYMENT_TIMEOUT + 60)) as bus:
        await bus.sagas.fire_due()  # returns once the timer's own firing is done, if it won
        await bus.drain(timeout=10)
        inst = await bus.sagas.get(SgOrderSaga, "late")
        assert inst is not None
        assert (inst.status, inst.state["failure"]) == ("compensated", "SgPaymentTimedOut")
    assert services.names() == ["SgCancelOrder"]
    rows = _sql(db, "SELECT COUNT(*) FROM events WHERE event_type = 'SgPaymentTimedOut'")
    assert rows == [(1,)], "fired once, in the log"
    assert _sql(db, "SELECT COUNT(*) FROM saga_deadlines") == [(0,)]


async def test_events_redelivered_after_a_restart_are_not_applied_again(tmp_path: Path) -> None:
    db = tmp_path / "redeliver.db"
    async with _bus(db, Services(silent=("shipping",))) as bus:
        await bus.publish(order("o-3"))
        await bus.drain(timeout=10)
    # As if the progress of the saga's deliveries had been lost (it is committed with the
    # saga's change, so only someone editing the file can do this).
    con = sqlite3.connect(db)
    con.execute("DELETE FROM progress WHERE subscription LIKE 'SgOrderSaga.%'")
    con.commit()
    con.close()
    before = _sql(db, "SELECT event_type, COUNT(*) FROM events GROUP BY 1 ORDER BY 1")
    async with _bus(db, Services(silent=("shipping",))) as bus:
        await bus.drain(timeout=10)
        s = bus.get_statistics()
        assert (s["sagas_duplicates"], s["sagas_started"]) == (3, 0)
        inst = await bus.sagas.get(SgOrderSaga, "o-3")
        assert inst is not None and (inst.status, inst.steps) == ("running", 3)
    assert _sql(db, "SELECT event_type, COUNT(*) FROM events GROUP BY 1 ORDER BY 1") == before


async def test_a_step_is_committed_with_the_events_it_published_and_the_progress_of_its_event(
    tmp_path: Path,
) -> None:
    db = tmp_path / "atomic.db"
    async with _bus(db, Services()) as bus:
        await bus.publish(order("o-4"))
        await bus.drain(timeout=10)
    applied = _sql(db, "SELECT event FROM saga_applied WHERE key = 'o-4' ORDER BY event")
    assert len(applied) == 4
    for (ref,) in applied:
        position = int(ref[1:])
        [(event_type,)] = _sql(db, "SELECT event_type FROM events WHERE position = ?", position)
        subs = [
            s for (s,) in _sql(db, "SELECT subscription FROM progress WHERE position = ?", position)
        ]
        assert any(s.startswith("SgOrderSaga.") for s in subs), (event_type, subs)
    commands = _sql(
        db,
        "SELECT c.event_type, json_extract(c.metadata, '$.subscription'), p.event_type FROM events c "
        "JOIN events p ON p.event_id = json_extract(c.metadata, '$.causation_id') "
        "WHERE c.event_type IN ('SgProcessPayment', 'SgReserveInventory', 'SgScheduleShipping') "
        "ORDER BY c.position",
    )
    assert commands == [
        ("SgProcessPayment", "SgOrderSaga.order_created", "SgOrderCreated"),
        ("SgReserveInventory", "SgOrderSaga.payment_processed", "SgPaymentProcessed"),
        ("SgScheduleShipping", "SgOrderSaga.inventory_reserved", "SgInventoryReserved"),
    ]
    [(status, steps, state)] = _sql(
        db, "SELECT status, steps, state FROM saga_instances WHERE key = 'o-4'"
    )
    assert (status, steps, json.loads(state)["tracking"]) == ("completed", 4, "trk-o-4")


class SgDurableBrittle(oxbus.Saga):
    key = "order_id"
    retry = RetryPolicy(max_attempts=2, base_delay=1.0, jitter=0.0)

    @oxbus.step(SgOrderCreated, starts=True)
    async def created(self, e: Any) -> None:
        self.on_failure(SgInventoryInsufficient(e.order_id))

    @oxbus.step(SgPaymentProcessed)
    async def paid(self, e: Any) -> None:
        raise LookupError(f"no ledger for {e.payment_id}")


async def test_a_failed_step_is_recorded_with_its_error_its_compensations_and_a_dead_letter(
    tmp_path: Path,
) -> None:
    db = tmp_path / "failed.db"
    clock = ManualClock()
    bus = EventBus(store=str(db), clock=clock)
    bus.register_saga(SgDurableBrittle)
    async with bus:
        await bus.publish(order("o-5"))
        await bus.publish(SgPaymentProcessed("o-5", payment_id="p-5"))
        await clock.drain(bus)
    [(status, error, compensated)] = _sql(
        db, "SELECT status, error, compensated FROM saga_instances WHERE key = 'o-5'"
    )
    assert (status, error, compensated) == ("failed", "paid: LookupError: no ledger for p-5", 1)
    assert _sql(db, "SELECT subscription, attempts, error_type FROM dead_letters") == [
        ("SgDurableBrittle.paid", 2, "LookupError")
    ]
    assert _sql(db, "SELECT COUNT(*) FROM events WHERE event_type = 'SgInventoryInsufficient'") == [
        (1,)
    ]
    done = "SELECT COUNT(*) FROM progress WHERE subscription = 'SgDurableBrittle.paid'"
    assert _sql(db, done) == [(1,)], "the failure is recorded with the event's progress"
    bus = EventBus(store=str(db))
    bus.register_saga(SgDurableBrittle)
    async with bus:
        [inst] = await bus.sagas.instances(SgDurableBrittle, state="failed")
        assert inst.key == "o-5" and len(bus.dead_letters) == 1


class SgPlainCommand:
    """Not a DomainEvent and not registered: a restart could not rebuild it."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id


async def test_a_compensation_a_restart_could_not_rebuild_is_refused_on_a_durable_bus(
    tmp_path: Path,
) -> None:
    class SgUnstorable(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            self.on_failure(SgPlainCommand(e.order_id))

    bus = EventBus(store=str(tmp_path / "plain.db"))
    bus.register_saga(SgUnstorable)
    async with bus:
        await bus.publish(order("o-6"))
        await bus.drain(timeout=10)
        [dead] = bus.dead_letters.list()
        assert dead.error_type == "oxbus.errors.InvalidSaga"
        assert "'SgPlainCommand' is not a registered event type" in dead.error_message
    with pytest.raises(InvalidSaga):
        raise InvalidSaga("the type is importable")


async def test_a_saga_registered_on_a_running_durable_bus_loads_its_instances(
    tmp_path: Path,
) -> None:
    db = tmp_path / "late.db"
    async with _bus(db, Services(silent=("payment",))) as bus:
        await bus.publish(order("o-7"))
        await bus.drain(timeout=10)
    bus = EventBus(store=str(db))
    Services().attach(bus)
    async with bus:
        bus.register_saga(SgOrderSaga)
        await bus.publish(SgPaymentProcessed("o-7", payment_id="p-7"))
        await bus.drain(timeout=10)
        inst = await bus.sagas.get(SgOrderSaga, "o-7")
        assert inst is not None and inst.status == "completed"


async def test_a_dead_lettered_saga_event_is_not_delivered_again_after_a_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "dead.db"
    for _ in range(2):
        async with _bus(db, Services()) as bus:
            if not len(bus.dead_letters):
                await bus.publish(SgOrderCreated(None, items=[], total=1))  # type: ignore[arg-type]
                await bus.publish(order("o-8"))
                await bus.publish(SgPaymentProcessed("o-8", payment_id="p"))
            await bus.drain(timeout=10)
            assert len(bus.dead_letters) == 1
            assert bus.get_statistics()["sagas_duplicates"] == 0
    # The failed step's event and the keyless one are both recorded as finished.
    [(position,)] = _sql(db, "SELECT position FROM dead_letters")
    assert _sql(db, "SELECT subscription FROM progress WHERE position = ?", position) == [
        ("SgOrderSaga.order_created",)
    ]
