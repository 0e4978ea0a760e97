"""Sagas on an in-memory bus (issue 16): seed 001's order saga end to end (completed, a payment
failure compensated, the 30-minute payment timeout on a virtual clock), instances found by key,
redelivered events, ordering per instance, steps that raise."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import oxbus
import pytest
from _saga import (
    PAYMENT_TIMEOUT,
    Services,
    SgInventoryReserved,
    SgOrderCreated,
    SgOrderSaga,
    SgPaymentProcessed,
    SgPaymentTimedOut,
    order,
)
from oxbus import EventBus, RetryPolicy
from oxbus.testing import ManualClock


@pytest.fixture
async def started() -> Any:
    """``await started(services, **bus_kwargs)``: a started bus with the seed saga and the
    services; stopped after the test."""
    buses: list[EventBus] = []

    async def make(services: Services, **kwargs: Any) -> EventBus:
        bus = EventBus(**kwargs)
        bus.register_saga(SgOrderSaga)
        services.attach(bus)
        await bus.start()
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.stop(timeout=5)


async def test_the_seed_order_saga_goes_order_payment_inventory_shipping_to_completed(
    started: Any,
) -> None:
    services = Services()
    bus = await started(services, workers=4)
    await bus.publish(order("o-1", total=42.0))
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-1")
    assert inst is not None
    assert (inst.status, inst.step, inst.steps) == ("completed", "shipping_scheduled", 4)
    assert inst.state == {
        "items": ["book", "pen"],
        "total": 42.0,
        "payment_id": "pay-o-1",
        "reservation_id": "res-o-1",
        "tracking": "trk-o-1",
    }
    assert services.names() == ["SgProcessPayment", "SgReserveInventory", "SgScheduleShipping"]
    assert inst.deadlines == {}, "the payment timeout was cancelled by the payment"
    assert not inst.compensated
    s = bus.get_statistics()
    assert (s["sagas_started"], s["sagas_completed"], s["sagas_running"]) == (1, 1, 0)


@pytest.mark.parametrize(
    ("failing", "compensations"),
    [
        ("payment", ["SgCancelOrder"]),
        ("inventory", ["SgRefundPayment", "SgCancelOrder"]),
        ("shipping", ["SgReleaseInventory", "SgRefundPayment", "SgCancelOrder"]),
    ],
)
async def test_a_failing_service_publishes_the_compensations_registered_so_far_in_reverse(
    started: Any, failing: str, compensations: list[str]
) -> None:
    services = Services(fail=failing)
    bus = await started(services, workers=4)
    await bus.publish(order("o-2"))
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-2")
    assert inst is not None and inst.status == "compensated" and inst.compensated
    commands = {"payment": 1, "inventory": 2, "shipping": 3}[failing]
    assert services.names()[commands:] == compensations
    assert inst.compensations == [], "published, so no longer pending"
    s = bus.get_statistics()
    assert (s["sagas_compensated"], s["sagas_completed"], s["sagas_failed"]) == (1, 0, 0)


async def test_a_payment_that_never_answers_times_out_after_30_minutes_of_virtual_time(
    started: Any,
) -> None:
    clock = ManualClock()
    services = Services(silent=("payment",))
    bus = await started(services, clock=clock)
    await bus.publish(order("o-3"))
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-3")
    assert inst is not None and inst.deadlines == {"SgPaymentTimedOut": PAYMENT_TIMEOUT}
    clock.advance(PAYMENT_TIMEOUT - 1)
    assert await bus.sagas.fire_due() == 0
    assert (await bus.sagas.get(SgOrderSaga, "o-3")).status == "running"  # type: ignore[union-attr]
    timed_out = bus.wait_for(SgPaymentTimedOut, timeout=10)
    clock.advance(1)  # the bus's own timer publishes it
    assert (await timed_out).order_id == "o-3"
    await bus.sagas.fire_due()
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-3")
    assert inst is not None
    assert (inst.status, inst.state["failure"]) == ("compensated", "SgPaymentTimedOut")
    assert services.names() == ["SgProcessPayment", "SgCancelOrder"]


async def test_a_deadline_the_next_step_cancels_never_fires(started: Any) -> None:
    clock = ManualClock()
    services = Services(silent=("inventory",))  # stops after the payment: the saga stays running
    bus = await started(services, clock=clock)
    await bus.publish(order("o-4"))
    await bus.drain(timeout=10)
    clock.advance(PAYMENT_TIMEOUT * 10)
    assert await bus.sagas.fire_due() == 0
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-4")
    assert inst is not None and (inst.status, inst.step) == ("running", "payment_processed")


async def test_an_instance_that_ends_cancels_its_deadlines(started: Any) -> None:
    class SgQuick(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            self.deadline(60, SgPaymentTimedOut(e.order_id))
            self.complete()

    clock = ManualClock()
    bus = EventBus(clock=clock)
    bus.register_saga(SgQuick)
    async with bus:
        await bus.publish(order("o-5"))
        await bus.drain(timeout=10)
        clock.advance(120)
        assert await bus.sagas.fire_due() == 0
        inst = await bus.sagas.get(SgQuick, "o-5")
        assert inst is not None and inst.status == "completed" and inst.deadlines == {}


async def test_an_event_whose_key_has_no_instance_starts_one_only_on_a_starting_step(
    started: Any,
) -> None:
    services = Services()
    bus = await started(services)
    await bus.publish(SgPaymentProcessed("nobody", payment_id="p"))
    await bus.publish(SgInventoryReserved("nobody", reservation_id="r"))
    await bus.drain(timeout=10)
    assert await bus.sagas.get(SgOrderSaga, "nobody") is None
    assert await bus.sagas.instances() == []
    assert bus.get_statistics()["sagas_ignored"] == 2
    assert services.seen == []


async def test_events_for_an_ended_instance_are_ignored(started: Any) -> None:
    services = Services()
    bus = await started(services)
    await bus.publish(order("o-6"))
    await bus.drain(timeout=10)
    await bus.publish(order("o-6"))  # a second order with the same id: a new event
    await bus.publish(SgPaymentProcessed("o-6", payment_id="again"))
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-6")
    assert inst is not None and (inst.status, inst.steps) == ("completed", 4)
    assert bus.get_statistics()["sagas_ignored"] == 2
    assert bus.get_statistics()["sagas_started"] == 1


async def test_a_redelivered_event_is_applied_to_its_instance_once(started: Any) -> None:
    services = Services(silent=("payment", "inventory"))
    bus = await started(services)
    created = order("o-7")
    await bus.publish(created)
    paid = SgPaymentProcessed("o-7", payment_id="pay-1")
    await bus.publish(paid)
    await bus.publish(paid)  # the same event (same event_id) again
    await bus.publish(created)
    await bus.drain(timeout=10)
    inst = await bus.sagas.get(SgOrderSaga, "o-7")
    assert inst is not None and (inst.step, inst.steps) == ("payment_processed", 2)
    assert services.names() == ["SgProcessPayment", "SgReserveInventory"]
    assert bus.get_statistics()["sagas_duplicates"] == 2


class SgSlowSaga(oxbus.Saga):
    """Records when each application starts and ends, suspending in between."""

    key = "order_id"
    log: ClassVar[list[tuple[str, str, int]]] = []

    @oxbus.step("sg.tick", starts=True)
    async def tick(self, e: dict[str, Any]) -> None:
        self.log.append(("in", e["order_id"], e["n"]))
        for _ in range(3):
            await asyncio.sleep(0)  # sleep-ok: a real suspension inside the step
        self.state.setdefault("seen", []).append(e["n"])
        self.log.append(("out", e["order_id"], e["n"]))


@pytest.mark.parametrize("keyed", [True, False])
async def test_events_of_one_instance_are_applied_one_at_a_time_in_order_with_many_workers(
    keyed: bool,
) -> None:
    """Keyed: the events' ordering key is the saga key. Unkeyed: they have no ordering key, so
    the bus runs them concurrently; the instance still takes them one at a time."""
    SgSlowSaga.log = []
    bus = EventBus(workers=8)
    bus.register_saga(SgSlowSaga)
    async with bus:
        for n in range(40):
            event = {"event_type": "sg.tick", "order_id": f"k{n % 4}", "n": n}
            await bus.publish(event, key=event["order_id"] if keyed else None)
        await bus.drain(timeout=10)
        inside: dict[str, int] = {}
        for what, key, _ in SgSlowSaga.log:
            inside[key] = inside.get(key, 0) + (1 if what == "in" else -1)
            assert inside[key] in (0, 1), f"two applications of {key} at once"
        for k in range(4):
            inst = await bus.sagas.get(SgSlowSaga, f"k{k}")
            assert inst is not None and len(inst.state["seen"]) == 10
            if keyed:
                assert inst.state["seen"] == sorted(inst.state["seen"])


class SgFlaky(oxbus.Saga):
    key = "order_id"
    retry = RetryPolicy(max_attempts=3, base_delay=1.0, jitter=0.0)
    failures = 0

    @oxbus.step(SgOrderCreated, starts=True)
    async def created(self, e: Any) -> None:
        self.state["attempt"] = self.state.get("attempt", 0) + 1
        await self.publish(SgPaymentProcessed(e.order_id, payment_id="x"))
        self.on_failure(SgPaymentTimedOut(e.order_id))
        if SgFlaky.failures:
            SgFlaky.failures -= 1
            raise ConnectionError("gateway down")


async def test_a_step_that_raises_is_retried_and_only_its_last_attempt_takes_effect() -> None:
    SgFlaky.failures = 2
    clock = ManualClock()
    bus = EventBus(clock=clock)
    bus.register_saga(SgFlaky)
    paid: list[Any] = []
    bus.subscribe(SgPaymentProcessed, paid.append)
    async with bus:
        await bus.publish(order("o-8"))
        await clock.drain(bus)
        inst = await bus.sagas.get(SgFlaky, "o-8")
        assert inst is not None
        assert (inst.status, inst.state, inst.steps) == ("running", {"attempt": 1}, 1)
        assert inst.compensations == ["SgPaymentTimedOut"]
        assert len(paid) == 1, "the failed attempts published nothing"
        s = bus.get_statistics()
        assert (s["retried"], s["dead_lettered"], s["sagas_failed"]) == (2, 0, 0)


async def test_a_step_the_retry_policy_gives_up_on_compensates_fails_the_instance_and_is_a_dead_letter() -> (
    None
):
    class SgBrittle(oxbus.Saga):
        key = "order_id"
        retry = RetryPolicy(max_attempts=2, base_delay=0.5, jitter=0.0)

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            self.on_failure(SgPaymentTimedOut(e.order_id, n=1))
            self.on_failure(SgPaymentTimedOut(e.order_id, n=2))

        @oxbus.step(SgPaymentProcessed)
        async def paid(self, e: Any) -> None:
            self.state["touched"] = True
            raise ValueError(f"cannot book payment {e.payment_id}")

    clock = ManualClock()
    bus = EventBus(clock=clock)
    bus.register_saga(SgBrittle)
    published: list[Any] = []
    bus.subscribe(SgPaymentTimedOut, published.append)
    async with bus:
        await bus.publish(order("o-9"))
        await bus.publish(SgPaymentProcessed("o-9", payment_id="p-9"))
        await clock.drain(bus)
        inst = await bus.sagas.get(SgBrittle, "o-9")
        assert inst is not None
        assert (inst.status, inst.step, inst.compensated) == ("failed", "created", True)
        assert inst.error == "paid: ValueError: cannot book payment p-9"
        assert "touched" not in inst.state
        assert [e.n for e in published] == [2, 1], "compensations in reverse order"
        [dead] = bus.dead_letters.list()
        assert (dead.subscription, dead.attempts, dead.error_type) == (
            "SgBrittle.paid",
            2,
            "ValueError",
        )
        s = bus.get_statistics()
        assert (s["sagas_failed"], s["sagas_compensated"], s["sagas_running"]) == (1, 1, 0)
        # Retrying the dead letter finds it applied (as the failure) already: skipped.
        assert await bus.dead_letters.retry() == 1
        await clock.drain(bus)
        assert bus.get_statistics()["sagas_duplicates"] == 1
        assert (await bus.sagas.get(SgBrittle, "o-9")).status == "failed"  # type: ignore[union-attr]


async def test_a_starting_step_that_fails_for_good_leaves_a_failed_instance() -> None:
    class SgNoStart(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            raise RuntimeError("no")

    bus = EventBus()
    bus.register_saga(SgNoStart)
    async with bus:
        await bus.publish(order("o-10"))
        await bus.drain(timeout=10)
        [inst] = await bus.sagas.instances(SgNoStart, state="failed")
        assert (inst.key, inst.step, inst.error, inst.compensated) == (
            "o-10",
            None,
            "created: RuntimeError: no",
            False,
        )
        assert len(bus.dead_letters) == 1


async def test_fail_records_the_reason_and_complete_ends_the_instance() -> None:
    class SgEnds(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            if e.total > 100:
                self.fail(f"total {e.total} over the limit")
            else:
                self.complete()

    bus = EventBus()
    bus.register_saga(SgEnds)
    async with bus:
        await bus.publish(order("small", total=5))
        await bus.publish(order("big", total=500))
        await bus.drain(timeout=10)
        assert [i.key for i in await bus.sagas.instances(SgEnds, state="completed")] == ["small"]
        [big] = await bus.sagas.instances(SgEnds, state="failed")
        assert (big.key, big.error) == ("big", "total 500 over the limit")
        s = bus.get_statistics()
        assert (s["sagas_started"], s["sagas_completed"], s["sagas_failed"]) == (2, 1, 1)


async def test_an_event_without_the_key_field_is_a_dead_letter_naming_the_field() -> None:
    bus = EventBus()
    bus.register_saga(SgOrderSaga)
    async with bus:
        await bus.publish(SgOrderCreated(None, items=[], total=1))  # type: ignore[arg-type]
        await bus.drain(timeout=10)
        [dead] = bus.dead_letters.list()
        assert dead.error_type == "oxbus.errors.InvalidEvent"
        assert "has no 'order_id' (the saga's key)" in dead.error_message


async def test_state_that_is_not_json_fails_the_step_and_keeps_the_instance_as_it_was() -> None:
    class SgOpaque(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            self.state["ok"] = 1

        @oxbus.step(SgPaymentProcessed)
        async def paid(self, e: Any) -> None:
            self.state["blob"] = b"\x00"

    bus = EventBus()
    bus.register_saga(SgOpaque)
    async with bus:
        await bus.publish(order("o-11"))
        await bus.publish(SgPaymentProcessed("o-11", payment_id="p"))
        await bus.drain(timeout=10)
        inst = await bus.sagas.get(SgOpaque, "o-11")
        assert inst is not None and inst.state == {"ok": 1}
        [dead] = bus.dead_letters.list()
        assert dead.error_type == "oxbus.errors.SerializationError"


async def test_a_step_of_a_subclass_takes_the_events_of_its_type_and_the_base_step_the_rest() -> (
    None
):
    class SgSpecial(SgPaymentProcessed): ...

    class SgSplit(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None: ...

        @oxbus.step(SgPaymentProcessed)
        async def paid(self, e: Any) -> None:
            self.state.setdefault("by", []).append("paid")

        @oxbus.step(SgSpecial)
        async def special(self, e: Any) -> None:
            self.state.setdefault("by", []).append("special")

    bus = EventBus()
    bus.register_saga(SgSplit)
    async with bus:
        await bus.publish(order("o-12"))
        await bus.publish(SgSpecial("o-12", payment_id="s"))
        await bus.publish(SgPaymentProcessed("o-12", payment_id="p"))
        await bus.drain(timeout=10)
        inst = await bus.sagas.get(SgSplit, "o-12")
        assert inst is not None and inst.state["by"] == ["special", "paid"]


async def test_the_steps_are_subscriptions_named_after_the_saga_and_the_step() -> None:
    bus = EventBus()
    bus.register_saga(SgOrderSaga)
    names = [s["name"] for s in bus.subscriptions()]
    assert names[:5] == [
        "SgOrderSaga.order_created",
        "SgOrderSaga.payment_processed",
        "SgOrderSaga.inventory_reserved",
        "SgOrderSaga.shipping_scheduled",
        "SgOrderSaga.failed[SgPaymentFailed]",
    ]
    assert bus.sagas.names == ["SgOrderSaga"]


async def test_deadlines_fire_only_while_the_bus_runs() -> None:
    clock = ManualClock()
    bus = EventBus(clock=clock)
    bus.register_saga(SgOrderSaga)
    async with bus:
        await bus.publish(order("o-13"))
        await bus.drain(timeout=10)
    clock.advance(PAYMENT_TIMEOUT)
    with pytest.raises(oxbus.BusClosed):
        await bus.sagas.fire_due()
    inst = await bus.sagas.get(SgOrderSaga, "o-13")
    assert inst is not None and inst.deadlines == {"SgPaymentTimedOut": PAYMENT_TIMEOUT}


async def test_statistics_and_metrics_count_instances_per_saga(started: Any) -> None:
    services = Services(fail="inventory")
    bus = await started(services)
    await bus.publish(order("o-14"))
    await bus.publish(SgPaymentProcessed("nobody", payment_id="p"))
    await bus.drain(timeout=10)
    s = bus.get_statistics()
    assert s["by_saga"] == {
        "SgOrderSaga": {
            "started": 1,
            "completed": 0,
            "compensated": 1,
            "failed": 0,
            "ignored": 1,
            "duplicates": 0,
            "running": 0,
        }
    }
    text = bus.metrics()
    assert (
        'oxbus_saga_instances_total{bus="oxbus",outcome="compensated",saga="SgOrderSaga"} 1.0'
        in text
    )
    assert (
        'oxbus_saga_events_skipped_total{bus="oxbus",reason="ignored",saga="SgOrderSaga"} 1.0'
        in text
    )
    assert 'oxbus_saga_instances_running{bus="oxbus",saga="SgOrderSaga"} 0.0' in text
