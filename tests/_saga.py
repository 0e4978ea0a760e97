"""Seed 001's order saga (order -> payment -> inventory -> shipping, compensated in reverse when
a step fails, a 30-minute payment timeout) as the saga tests use it, with stand-in services.

Class names start with ``Sg`` (the registry is keyed by type key for the whole session).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import oxbus
from oxbus import DomainEvent, EventBus


class SgEvent(DomainEvent):
    """An order event: its ``aggregate_id`` (the ordering key) is the order id, which is also
    the saga's key."""

    def __init__(self, order_id: str, **fields: Any) -> None:
        super().__init__()
        self.order_id = order_id
        self.__dict__.update(fields)

    @property
    def aggregate_id(self) -> str:
        return self.order_id

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.order_id!r})"


class SgOrderCreated(SgEvent): ...


class SgProcessPayment(SgEvent): ...


class SgPaymentProcessed(SgEvent): ...


class SgPaymentFailed(SgEvent): ...


class SgPaymentTimedOut(SgEvent): ...


class SgReserveInventory(SgEvent): ...


class SgInventoryReserved(SgEvent): ...


class SgInventoryInsufficient(SgEvent): ...


class SgScheduleShipping(SgEvent): ...


class SgShippingScheduled(SgEvent): ...


class SgShippingFailed(SgEvent): ...


class SgCancelOrder(SgEvent): ...


class SgRefundPayment(SgEvent): ...


class SgReleaseInventory(SgEvent): ...


PAYMENT_TIMEOUT = 30 * 60.0

COMMANDS = (SgProcessPayment, SgReserveInventory, SgScheduleShipping)
COMPENSATIONS = (SgCancelOrder, SgRefundPayment, SgReleaseInventory)


class SgOrderSaga(oxbus.Saga):
    """The seed's ``EventDrivenSaga`` as one class."""

    key = "order_id"

    @oxbus.step(SgOrderCreated, starts=True)
    async def order_created(self, e: SgOrderCreated) -> None:
        self.state.update(items=e.items, total=e.total)
        await self.publish(SgProcessPayment(e.order_id, amount=e.total))
        self.on_failure(SgCancelOrder(e.order_id))
        self.deadline(PAYMENT_TIMEOUT, SgPaymentTimedOut(e.order_id))

    @oxbus.step(SgPaymentProcessed)
    async def payment_processed(self, e: SgPaymentProcessed) -> None:
        self.cancel_deadline(SgPaymentTimedOut)
        self.state["payment_id"] = e.payment_id
        await self.publish(SgReserveInventory(e.order_id, items=self.state["items"]))
        self.on_failure(SgRefundPayment(e.order_id, payment_id=e.payment_id))

    @oxbus.step(SgInventoryReserved)
    async def inventory_reserved(self, e: SgInventoryReserved) -> None:
        self.state["reservation_id"] = e.reservation_id
        await self.publish(SgScheduleShipping(e.order_id))
        self.on_failure(SgReleaseInventory(e.order_id, reservation_id=e.reservation_id))

    @oxbus.step(SgShippingScheduled)
    async def shipping_scheduled(self, e: SgShippingScheduled) -> None:
        self.state["tracking"] = e.tracking
        self.complete()

    @oxbus.step(SgPaymentFailed, SgPaymentTimedOut, SgInventoryInsufficient, SgShippingFailed)
    async def failed(self, e: SgEvent) -> None:
        self.state["failure"] = type(e).__name__
        await self.compensate()


@dataclass
class Services:
    """Payment, inventory and shipping as handlers of the saga's commands; ``fail`` names the
    service that refuses (``"payment"``, ``"inventory"``, ``"shipping"``), ``silent`` the ones
    that never answer. ``seen`` collects every command and compensation, in order."""

    fail: str | None = None
    silent: tuple[str, ...] = ()
    seen: list[Any] = field(default_factory=list)

    def attach(self, bus: EventBus) -> None:
        async def payment(e: SgProcessPayment) -> None:
            self.seen.append(e)
            if "payment" in self.silent:
                return
            if self.fail == "payment":
                await bus.publish(SgPaymentFailed(e.order_id, reason="card declined"))
            else:
                await bus.publish(SgPaymentProcessed(e.order_id, payment_id=f"pay-{e.order_id}"))

        async def inventory(e: SgReserveInventory) -> None:
            self.seen.append(e)
            if "inventory" in self.silent:
                return
            if self.fail == "inventory":
                await bus.publish(SgInventoryInsufficient(e.order_id))
            else:
                await bus.publish(
                    SgInventoryReserved(e.order_id, reservation_id=f"res-{e.order_id}")
                )

        async def shipping(e: SgScheduleShipping) -> None:
            self.seen.append(e)
            if "shipping" in self.silent:
                return
            if self.fail == "shipping":
                await bus.publish(SgShippingFailed(e.order_id))
            else:
                await bus.publish(SgShippingScheduled(e.order_id, tracking=f"trk-{e.order_id}"))

        async def compensation(e: SgEvent) -> None:
            self.seen.append(e)

        bus.subscribe(SgProcessPayment, payment, name="payment_service")
        bus.subscribe(SgReserveInventory, inventory, name="inventory_service")
        bus.subscribe(SgScheduleShipping, shipping, name="shipping_service")
        for c in COMPENSATIONS:
            bus.subscribe(c, compensation, name=f"compensation_{c.__name__}")

    def names(self, order_id: str | None = None) -> list[str]:
        return [type(e).__name__ for e in self.seen if order_id is None or e.order_id == order_id]


def order(order_id: str, total: float = 30.0) -> SgOrderCreated:
    return SgOrderCreated(order_id, items=["book", "pen"], total=total)
