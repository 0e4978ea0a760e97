"""Seed 001's order saga: order -> payment -> inventory -> shipping, compensated in reverse when
a step fails, with a 30-minute payment timeout, on a durable bus whose saga state survives a
restart.

Four orders: one goes through, one is declined by the payment service, one finds no stock
(its payment is refunded, then the order cancelled), and one waits for a payment gateway that
never answers until its 30-minute deadline passes. The deadline runs on a virtual clock
(``oxbus.testing.ManualClock``) so the example does not wait 30 minutes; the bus is stopped
while that order waits and a new bus on the same file picks it up.

Run: .venv/bin/python examples/order_saga.py
(it ends with ``oxbus sagas FILE``; try ``oxbus flow FILE`` on the file it names too).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass, field

import oxbus
from oxbus import DomainEvent, EventBus
from oxbus.cli import main as main_cli
from oxbus.testing import ManualClock

PAYMENT_TIMEOUT = 30 * 60.0


@dataclass(frozen=True)
class OrderEvent(DomainEvent):
    order_id: str

    @property
    def aggregate_id(self) -> str:  # per-order ordering; also the saga's key
        return self.order_id


@dataclass(frozen=True)
class OrderCreated(OrderEvent):
    items: list[str] = field(default_factory=list)
    total: float = 0.0


@dataclass(frozen=True)
class ProcessPayment(OrderEvent):
    amount: float = 0.0


@dataclass(frozen=True)
class PaymentProcessed(OrderEvent):
    payment_id: str = ""


@dataclass(frozen=True)
class PaymentDeclined(OrderEvent):
    reason: str = ""


@dataclass(frozen=True)
class PaymentTimedOut(OrderEvent): ...


@dataclass(frozen=True)
class ReserveInventory(OrderEvent):
    items: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class InventoryReserved(OrderEvent):
    reservation_id: str = ""


@dataclass(frozen=True)
class InventoryInsufficient(OrderEvent): ...


@dataclass(frozen=True)
class ScheduleShipping(OrderEvent): ...


@dataclass(frozen=True)
class ShippingScheduled(OrderEvent):
    tracking: str = ""


# Compensations.
@dataclass(frozen=True)
class CancelOrder(OrderEvent): ...


@dataclass(frozen=True)
class RefundPayment(OrderEvent):
    payment_id: str = ""


@dataclass(frozen=True)
class ReleaseInventory(OrderEvent):
    reservation_id: str = ""


class OrderSaga(oxbus.Saga):
    """The seed's hand-written ``EventDrivenSaga`` (a dict of state, a compensation stack, an
    if-chain over event types) as one class."""

    key = "order_id"

    @oxbus.step(OrderCreated, starts=True)
    async def order_created(self, e: OrderCreated) -> None:
        self.state.update(items=e.items, total=e.total)
        await self.publish(ProcessPayment(e.order_id, amount=e.total))
        self.on_failure(CancelOrder(e.order_id))
        self.deadline(PAYMENT_TIMEOUT, PaymentTimedOut(e.order_id))

    @oxbus.step(PaymentProcessed)
    async def payment_processed(self, e: PaymentProcessed) -> None:
        self.cancel_deadline(PaymentTimedOut)
        self.state["payment_id"] = e.payment_id
        await self.publish(ReserveInventory(e.order_id, items=self.state["items"]))
        self.on_failure(RefundPayment(e.order_id, payment_id=e.payment_id))

    @oxbus.step(InventoryReserved)
    async def inventory_reserved(self, e: InventoryReserved) -> None:
        self.state["reservation_id"] = e.reservation_id
        await self.publish(ScheduleShipping(e.order_id))
        self.on_failure(ReleaseInventory(e.order_id, reservation_id=e.reservation_id))

    @oxbus.step(ShippingScheduled)
    async def shipping_scheduled(self, e: ShippingScheduled) -> None:
        self.state["tracking"] = e.tracking
        self.complete()

    @oxbus.step(PaymentDeclined, PaymentTimedOut, InventoryInsufficient)
    async def failed(self, e: OrderEvent) -> None:
        self.state["failure"] = type(e).__name__
        await self.compensate()  # publishes the compensations, last registered first


def services(bus: EventBus, log: list[str]) -> None:
    """Stand-ins for the payment, inventory and shipping services."""
    stock = {"book": 5, "pen": 5, "piano": 0}

    async def payment(c: ProcessPayment) -> None:
        if c.order_id == "o-4":
            return  # the gateway never answers
        if c.amount > 1000:
            await bus.publish(PaymentDeclined(c.order_id, reason="over the card limit"))
        else:
            await bus.publish(PaymentProcessed(c.order_id, payment_id=f"pay-{c.order_id}"))

    async def inventory(c: ReserveInventory) -> None:
        if any(stock.get(item, 0) < 1 for item in c.items):
            await bus.publish(InventoryInsufficient(c.order_id))
            return
        for item in c.items:
            stock[item] -= 1
        await bus.publish(InventoryReserved(c.order_id, reservation_id=f"res-{c.order_id}"))

    async def shipping(c: ScheduleShipping) -> None:
        await bus.publish(ShippingScheduled(c.order_id, tracking=f"trk-{c.order_id}"))

    async def compensation(c: OrderEvent) -> None:
        log.append(f"{c.order_id}: {type(c).__name__}")

    bus.subscribe(ProcessPayment, payment, name="payment")
    bus.subscribe(ReserveInventory, inventory, name="inventory")
    bus.subscribe(ScheduleShipping, shipping, name="shipping")
    for c in (CancelOrder, RefundPayment, ReleaseInventory):
        bus.subscribe(c, compensation, name=f"compensations.{c.__name__}")


def make_bus(path: str, clock: ManualClock, log: list[str]) -> EventBus:
    bus = EventBus(store=path, workers=4, clock=clock)
    bus.register_saga(OrderSaga)
    services(bus, log)
    return bus


async def main() -> None:
    path = os.path.join(tempfile.mkdtemp(), "orders.db")
    log: list[str] = []
    clock = ManualClock()
    async with make_bus(path, clock, log) as bus:
        await bus.publish(OrderCreated("o-1", items=["book", "pen"], total=30.0))
        await bus.publish(OrderCreated("o-2", items=["book"], total=5000.0))
        await bus.publish(OrderCreated("o-3", items=["piano"], total=900.0))
        await bus.publish(OrderCreated("o-4", items=["pen"], total=3.0))
        await bus.drain()
        for inst in await bus.sagas.instances(OrderSaga):
            print(f"{inst.key}: {inst.status} at step {inst.step}")
    print("bus stopped while o-4 waits for its payment")

    clock = ManualClock(start=clock.time() + PAYMENT_TIMEOUT)  # half an hour later
    async with make_bus(path, clock, log) as bus:
        await bus.sagas.fire_due()  # the deadline that passed while the bus was down
        await bus.drain()
        for inst in await bus.sagas.instances(OrderSaga):
            why = inst.state.get("failure") or f"tracking {inst.state.get('tracking')}"
            print(f"{inst.key}: {inst.status} after {inst.steps} steps ({why})")
    print("compensations, in the order published:")
    for line in log:
        print(f"  {line}")
    print(f"\n$ oxbus sagas {path}")
    main_cli(["sagas", path], standalone_mode=False)
    assert [line.split(": ")[1] for line in log if line.startswith("o-3")] == [
        "RefundPayment",
        "CancelOrder",
    ]


if __name__ == "__main__":
    asyncio.run(main())
