"""The allocation service of *Architecture Patterns with Python* ("Cosmic Python") with oxbus as its message bus.

The domain model (``Batch``, ``OrderLine``, the ``Product`` aggregate), the commands
(``CreateBatch``, ``Allocate``, ``ChangeBatchQuantity``), the events (``Allocated``,
``Deallocated``, ``OutOfStock``), the handlers and an in-memory unit of work follow the book.
The book's ``messagebus.handle()`` loop becomes a thin ``MessageBus`` over an oxbus
``EventBus``: a handler runs in a unit of work, and the events its aggregate recorded are then
published on the bus — so they inherit the correlation id of what caused them, and their
causation id names it (``oxbus.current_envelope()``). A command has exactly one handler; an
event may have many. Every message of a product carries its sku as ``aggregate_id``, so with
four workers each product's messages are handled in order.

The run: batches are created, orders allocated (one out of stock, one with an unknown sku),
then an external "change_batch_quantity" message (as from the book's Redis channel) shrinks a
batch: its lines are deallocated and reallocated — a cascade printed as a causal tree.

Run: .venv/bin/python examples/allocation.py
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass, fields
from datetime import date, timedelta
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Type

from oxbus import DomainEvent, EventBus, current_envelope

# ------------------------------------------------------------------------------- commands


class Command:
    """A request to do something: handled by exactly one handler."""

    @property
    def aggregate_id(self) -> Optional[str]:  # the ordering key: the product's sku
        return getattr(self, "sku", None)


@dataclass(frozen=True)
class CreateBatch(Command):
    ref: str
    sku: str
    qty: int
    eta: Optional[date] = None


@dataclass(frozen=True)
class Allocate(Command):
    orderid: str
    sku: str
    qty: int


@dataclass(frozen=True)
class ChangeBatchQuantity(Command):
    ref: str
    qty: int


# --------------------------------------------------------------------------------- events


class Event(DomainEvent):
    """Something that happened: any number of handlers. Keyed by the product's sku."""

    sku: str

    @property
    def aggregate_id(self) -> str:
        return self.sku


@dataclass(frozen=True)
class Allocated(Event):
    orderid: str
    sku: str
    qty: int
    batchref: str


@dataclass(frozen=True)
class Deallocated(Event):
    orderid: str
    sku: str
    qty: int


@dataclass(frozen=True)
class OutOfStock(Event):
    sku: str


# ---------------------------------------------------------------------------------- model


class InvalidSku(Exception):
    pass


@dataclass(frozen=True)
class OrderLine:
    orderid: str
    sku: str
    qty: int


class Batch:
    def __init__(self, ref: str, sku: str, qty: int, eta: Optional[date]) -> None:
        self.reference, self.sku, self.eta = ref, sku, eta
        self._purchased_quantity = qty
        self._allocations: Dict[str, OrderLine] = {}  # in allocation order

    def __gt__(self, other: Batch) -> bool:  # stock in the warehouse (no eta) comes first
        if self.eta is None:
            return False
        if other.eta is None:
            return True
        return self.eta > other.eta

    def allocate(self, line: OrderLine) -> None:
        if self.can_allocate(line):
            self._allocations[line.orderid] = line

    def deallocate_one(self) -> OrderLine:
        return self._allocations.pop(next(reversed(list(self._allocations))))  # the latest

    @property
    def allocated_quantity(self) -> int:
        return sum(line.qty for line in self._allocations.values())

    @property
    def available_quantity(self) -> int:
        return self._purchased_quantity - self.allocated_quantity

    def can_allocate(self, line: OrderLine) -> bool:
        return self.sku == line.sku and self.available_quantity >= line.qty


class Product:
    """The aggregate: the consistency boundary for one sku's batches."""

    def __init__(self, sku: str, batches: List[Batch], version_number: int = 0) -> None:
        self.sku, self.batches, self.version_number = sku, batches, version_number
        self.events: List[Any] = []  # events and commands to publish after commit

    def allocate(self, line: OrderLine) -> Optional[str]:
        try:
            batch = next(b for b in sorted(self.batches) if b.can_allocate(line))
        except StopIteration:
            self.events.append(OutOfStock(line.sku))
            return None
        batch.allocate(line)
        self.version_number += 1
        self.events.append(Allocated(line.orderid, line.sku, line.qty, batch.reference))
        return batch.reference

    def change_batch_quantity(self, ref: str, qty: int) -> None:
        batch = next(b for b in self.batches if b.reference == ref)
        batch._purchased_quantity = qty
        while batch.available_quantity < 0:
            line = batch.deallocate_one()
            self.events.append(Deallocated(line.orderid, line.sku, line.qty))


# ------------------------------------------------------------------ repository, unit of work


class Database:
    """The in-memory "database": products, the allocations read model, sent messages."""

    def __init__(self) -> None:
        self.products: Dict[str, Product] = {}
        self.allocations_view: Dict[str, Tuple[str, str]] = {}  # orderid -> (sku, batchref)
        self.line_allocated_channel: List[str] = []  # what the book publishes to Redis
        self.emails: List[str] = []


class InMemoryRepository:
    def __init__(self, products: Dict[str, Product]) -> None:
        self._products = products
        self.seen: Set[Product] = set()

    def add(self, product: Product) -> None:
        self._products[product.sku] = product
        self.seen.add(product)

    def get(self, sku: str) -> Optional[Product]:
        product = self._products.get(sku)
        if product is not None:
            self.seen.add(product)
        return product

    def get_by_batchref(self, ref: str) -> Product:
        product = next(p for p in self._products.values() if any(b.reference == ref for b in p.batches))
        self.seen.add(product)
        return product


class InMemoryUnitOfWork:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.products = InMemoryRepository(db.products)
        self.committed = False

    def __enter__(self) -> InMemoryUnitOfWork:
        return self

    def __exit__(self, *exc: object) -> None:
        pass  # a real one rolls back what was not committed

    def commit(self) -> None:
        self.committed = True

    def collect_new_events(self) -> Iterator[Any]:
        for product in self.products.seen:
            while product.events:
                yield product.events.pop(0)


# ------------------------------------------------------------------------------- handlers


def add_batch(cmd: CreateBatch, uow: InMemoryUnitOfWork) -> None:
    with uow:
        product = uow.products.get(cmd.sku)
        if product is None:
            product = Product(cmd.sku, batches=[])
            uow.products.add(product)
        product.batches.append(Batch(cmd.ref, cmd.sku, cmd.qty, cmd.eta))
        uow.commit()


def allocate(cmd: Allocate, uow: InMemoryUnitOfWork) -> Optional[str]:
    line = OrderLine(cmd.orderid, cmd.sku, cmd.qty)
    with uow:
        product = uow.products.get(line.sku)
        if product is None:
            raise InvalidSku(f"Invalid sku {line.sku}")
        batchref = product.allocate(line)
        uow.commit()
        return batchref


def change_batch_quantity(cmd: ChangeBatchQuantity, uow: InMemoryUnitOfWork) -> None:
    with uow:
        product = uow.products.get_by_batchref(cmd.ref)
        product.change_batch_quantity(ref=cmd.ref, qty=cmd.qty)
        uow.commit()


def reallocate(event: Deallocated, uow: InMemoryUnitOfWork) -> None:
    with uow:
        product = uow.products.get(event.sku)
        assert product is not None
        product.events.append(Allocate(event.orderid, event.sku, event.qty))
        uow.commit()


def publish_allocated_event(event: Allocated, uow: InMemoryUnitOfWork) -> None:
    uow.db.line_allocated_channel.append(json.dumps(asdict(event)))  # r.publish("line_allocated", ...)


def add_allocation_to_read_model(event: Allocated, uow: InMemoryUnitOfWork) -> None:
    uow.db.allocations_view[event.orderid] = (event.sku, event.batchref)


def remove_allocation_from_read_model(event: Deallocated, uow: InMemoryUnitOfWork) -> None:
    uow.db.allocations_view.pop(event.orderid, None)


def send_out_of_stock_notification(event: OutOfStock, uow: InMemoryUnitOfWork) -> None:
    uow.db.emails.append(f"to stock@made.com: Out of stock for {event.sku}")


# --------------------------------------------------------------------------- message bus


@dataclass
class Trace:
    """One message as it was handled: what the bus's envelope said about it."""

    event_id: str
    causation_id: Optional[str]
    correlation_id: str
    message: Any
    handlers: List[str]


class MessageBus:
    """The book's message bus, on oxbus: commands have one handler, events any number."""

    def __init__(self, bus: EventBus, uow_factory: Callable[[], InMemoryUnitOfWork]) -> None:
        self.bus, self.uow_factory = bus, uow_factory
        self.command_handlers: Dict[type, Callable[..., Any]] = {}
        self.traces: Dict[str, Trace] = {}

    def command(self, cmd_type: Type[Command], handler: Callable[..., Any]) -> None:
        if cmd_type in self.command_handlers:
            raise ValueError(
                f"{cmd_type.__name__} is handled by {self.command_handlers[cmd_type].__name__} "
                f"already; a command has exactly one handler"
            )
        self.command_handlers[cmd_type] = handler
        self._subscribe(cmd_type, handler)

    def event(self, event_type: Type[Event], *handlers: Callable[..., Any]) -> None:
        for i, handler in enumerate(handlers):
            self._subscribe(event_type, handler, priority=i + 1)  # in the order given

    def _subscribe(self, message_type: type, handler: Callable[..., Any], priority: int = 1) -> None:
        async def run(message: Any) -> None:
            self._trace(message, handler.__name__)
            uow = self.uow_factory()
            handler(message, uow)
            for new in list(uow.collect_new_events()):
                await self.bus.publish(new)  # inherits this message's correlation id

        self.bus.subscribe(message_type, run, priority=priority, name=handler.__name__)

    def _trace(self, message: Any, handler: str) -> None:
        env = current_envelope()
        assert env is not None
        if isinstance(message, DomainEvent):  # the event shows its envelope's ids too
            assert (message.correlation_id, message.causation_id) == (env.correlation_id, env.causation_id)
        t = self.traces.setdefault(
            env.event_id, Trace(env.event_id, env.causation_id, env.correlation_id, message, [])
        )
        t.handlers.append(handler)

    async def handle(self, message: Any, correlation_id: Optional[str] = None) -> None:
        if isinstance(message, Command) and type(message) not in self.command_handlers:
            raise LookupError(f"no handler for command {type(message).__name__}")
        await self.bus.publish(message, correlation_id=correlation_id)

    def chain(self, correlation_id: str) -> List[str]:
        """The messages of one correlation id as an indented tree, causes before effects."""
        nodes = [t for t in self.traces.values() if t.correlation_id == correlation_id]
        children: Dict[Optional[str], List[Trace]] = {}
        for t in nodes:
            children.setdefault(t.causation_id, []).append(t)
        lines: List[str] = []

        def walk(parent: Optional[str], depth: int) -> None:
            for t in children.get(parent, []):
                lines.append(f"{'    ' * depth}{describe(t.message)} [{t.event_id[:8]}]"
                             f" -> {', '.join(t.handlers)}")
                walk(t.event_id, depth + 1)

        walk(None, 0)
        return lines


def describe(m: Any) -> str:
    shown = ", ".join(f"{f.name}={getattr(m, f.name)}" for f in fields(m) if getattr(m, f.name) is not None)
    return f"{type(m).__name__}({shown})"


def bootstrap(db: Database) -> Tuple[EventBus, MessageBus]:
    bus = EventBus(workers=4)
    mb = MessageBus(bus, lambda: InMemoryUnitOfWork(db))
    mb.command(CreateBatch, add_batch)
    mb.command(Allocate, allocate)
    mb.command(ChangeBatchQuantity, change_batch_quantity)
    mb.event(Allocated, publish_allocated_event, add_allocation_to_read_model)
    mb.event(Deallocated, remove_allocation_from_read_model, reallocate)
    mb.event(OutOfStock, send_out_of_stock_notification)
    return bus, mb


# ----------------------------------------------------------------------------- entrypoints


async def allocate_endpoint(bus: EventBus, mb: MessageBus, orderid: str, sku: str, qty: int) -> str:
    """POST /allocate: sends the command, answers with the outcome event of this request."""
    request = f"req-{orderid}"
    outcome = asyncio.ensure_future(bus.wait_for(
        "#", lambda e: isinstance(e, (Allocated, OutOfStock)) and e.correlation_id == request,
        timeout=2.0,
    ))
    await asyncio.sleep(0)  # let wait_for register: it only listens from its first step
    await mb.handle(Allocate(orderid, sku, qty), correlation_id=request)
    event = await outcome
    return f"201 batchref={event.batchref}" if isinstance(event, Allocated) else "400 Out of stock"


async def redis_change_batch_quantity(mb: MessageBus, m: Dict[str, Any]) -> None:
    """The book's Redis consumer: a "change_batch_quantity" message becomes a command."""
    data = json.loads(m["data"])
    await mb.handle(ChangeBatchQuantity(ref=data["batchref"], qty=data["qty"]),
                    correlation_id=m["id"])


async def main() -> None:
    logging.getLogger("oxbus").addHandler(logging.NullHandler())
    logging.getLogger("oxbus").propagate = False  # the failure is shown from the dead letters

    db = Database()
    bus, mb = bootstrap(db)
    today = date(2024, 5, 18)
    try:
        mb.command(Allocate, allocate)
    except ValueError as e:
        print(f"a second Allocate handler is refused: {e}")

    async with bus:
        print("== batches ==")
        await mb.handle(CreateBatch("batch-old", "RETRO-CLOCK", 10, eta=today))
        await mb.handle(CreateBatch("batch-new", "RETRO-CLOCK", 10, eta=today + timedelta(days=1)))
        await mb.handle(CreateBatch("batch-sofa", "MINIMAL-SOFA", 2))
        await bus.drain()
        for p in db.products.values():
            print(f"  {p.sku}: " + ", ".join(f"{b.reference} qty={b._purchased_quantity} eta={b.eta}" for b in p.batches))

        print("== allocations (POST /allocate) ==")
        for orderid, sku, qty in [("order-1", "RETRO-CLOCK", 6), ("order-2", "RETRO-CLOCK", 4),
                                  ("order-3", "MINIMAL-SOFA", 3)]:
            answer = await allocate_endpoint(bus, mb, orderid, sku, qty)
            print(f"  {orderid} {sku} x{qty}: {answer}")
        await mb.handle(Allocate("order-4", "NO-SUCH-THING", 1))
        await bus.drain()
        print("  causal chain of request req-order-3:")
        for line in mb.chain("req-order-3"):
            print("    " + line)
        for d in bus.dead_letters.list():
            print(f"  {describe(d.event)} failed in {d.subscription}: {d.error_type}: {d.error_message}")
        print("  allocations:", dict(sorted(db.allocations_view.items())))

        print("== Redis message change_batch_quantity {batchref: batch-old, qty: 5} ==")
        db.line_allocated_channel.clear()
        message = {"id": "redis-msg-1", "data": json.dumps({"batchref": "batch-old", "qty": 5})}
        await redis_change_batch_quantity(mb, message)
        await bus.drain()

    print("  causal chain (correlation id redis-msg-1; [event id], each under its cause):")
    for line in mb.chain("redis-msg-1"):
        print("    " + line)
    print("  published to line_allocated:")
    for msg in db.line_allocated_channel:
        print(f"    {msg}")
    print("== result ==")
    for orderid, (sku, batchref) in sorted(db.allocations_view.items()):
        print(f"  {orderid}: {sku} -> {batchref}")
    for p in db.products.values():
        for b in p.batches:
            print(f"  {b.reference}: purchased {b._purchased_quantity}, allocated {b.allocated_quantity} "
                  f"({', '.join(b._allocations) or 'none'}), available {b.available_quantity}")
    for email in db.emails:
        print(f"  email {email}")
    s = bus.get_statistics()
    print(f"  statistics: published={s['events_published']} processed={s['events_processed']} "
          f"failed={s['events_failed']} dead_lettered={s['dead_lettered']}")
    assert db.allocations_view == {"order-1": ("RETRO-CLOCK", "batch-new"),
                                   "order-2": ("RETRO-CLOCK", "batch-old")}


if __name__ == "__main__":
    asyncio.run(main())
