"""Routing: classes (subclasses match, never via the event_type string), type strings, Enum
members, AMQP-style patterns, priority, the decorator, and every kind of event object."""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pydantic
import pytest

import oxbus
from oxbus import DomainEvent, EventBus


class OrderEvent(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class OrderPlaced(OrderEvent):
    pass


class OrderPlacedExpress(OrderPlaced):
    pass


class OrderShipped(OrderEvent):
    pass


class Impostor(DomainEvent):
    """Not a OrderPlaced, but claims its type string."""

    event_type = "OrderPlaced"


class RenamedPlaced(OrderPlaced):
    """A subclass whose type string differs from every class name."""

    event_type = "order.placed.renamed"


class Topic:
    """A plain object whose type key is its ``event_type`` string."""

    def __init__(self, event_type: Any, n: int = 0) -> None:
        self.event_type = event_type
        self.n = n


class Kind(enum.Enum):
    PLACED = "order.placed"
    SHIPPED = "order.shipped"


def collector(seen: list[Any], tag: str) -> Any:
    async def handler(event: Any) -> None:
        seen.append((tag, event))

    handler.__qualname__ = f"collect_{tag}"
    return handler


async def test_class_subscription_matches_the_class_and_its_subclasses(make_bus: Any) -> None:
    bus = await make_bus(workers=2)
    seen: list[Any] = []
    bus.subscribe(OrderPlaced, collector(seen, "placed"))
    placed, express, shipped = (
        OrderPlaced("o-1"),
        OrderPlacedExpress("o-2"),
        OrderShipped("o-3"),
    )
    for e in (placed, express, shipped):
        await bus.publish(e)
    await bus.drain()
    got = [e for _, e in seen]
    assert len(got) == 2
    assert any(e is placed for e in got)
    assert any(e is express for e in got)


async def test_base_class_subscription_receives_every_subclass(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe(OrderEvent, collector(seen, "any-order"))
    bus.subscribe(DomainEvent, collector(seen, "any-domain"))
    await bus.publish(OrderShipped("o-1"))
    await bus.publish(Impostor())
    await bus.drain()
    assert [(t, type(e).__name__) for t, e in seen] == [
        ("any-order", "OrderShipped"),
        ("any-domain", "OrderShipped"),
        ("any-domain", "Impostor"),
    ]


async def test_class_subscription_never_matches_through_the_event_type_string(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe(OrderPlaced, collector(seen, "class"))
    bus.subscribe("OrderPlaced", collector(seen, "string"))
    impostor = Impostor()
    await bus.publish(impostor)
    await bus.drain()
    assert seen == [("string", impostor)]


async def test_class_subscription_matches_a_subclass_with_another_type_string(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe(OrderPlaced, collector(seen, "class"))
    bus.subscribe("order.placed.renamed", collector(seen, "string"))
    bus.subscribe("OrderPlaced", collector(seen, "old-name"))
    e = RenamedPlaced("o-1")
    await bus.publish(e)
    await bus.drain()
    assert seen == [("class", e), ("string", e)]


async def test_string_subscription_matches_the_type_key(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe("OrderShipped", collector(seen, "class-name"))
    bus.subscribe("invoice.paid", collector(seen, "explicit"))
    shipped = OrderShipped("o-1")
    paid = Topic("invoice.paid")
    other = Topic("invoice.voided")
    for e in (shipped, paid, other):
        await bus.publish(e)
    await bus.drain()
    assert seen == [("class-name", shipped), ("explicit", paid)]


async def test_plain_object_without_event_type_is_keyed_by_class_name(make_bus: Any) -> None:
    class LegacyThing:
        pass

    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe("LegacyThing", collector(seen, "s"))
    e = LegacyThing()
    await bus.publish(e)
    await bus.drain()
    assert seen == [("s", e)]


async def test_enum_member_subscription_matches_its_value(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe(Kind.PLACED, collector(seen, "enum"))
    as_enum = Topic(Kind.PLACED)
    as_str = Topic("order.placed")
    as_dict = {"event_type": "order.placed", "n": 1}
    enum_dict = {"event_type": Kind.PLACED, "n": 2}
    shipped = Topic(Kind.SHIPPED)
    for e in (as_enum, as_str, as_dict, enum_dict, shipped):
        await bus.publish(e)
    await bus.drain()
    got = [e for _, e in seen]
    assert len(got) == 4
    for expected in (as_enum, as_str, as_dict, enum_dict):
        assert any(g is expected for g in got)


async def test_string_subscription_matches_an_event_whose_event_type_is_an_enum(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe("order.shipped", collector(seen, "s"))
    e = Topic(Kind.SHIPPED)
    await bus.publish(e)
    await bus.drain()
    assert seen == [("s", e)]


@pytest.mark.parametrize(
    ("pattern", "matching", "not_matching"),
    [
        (
            "order.*",
            ["order.placed", "order.shipped"],
            ["order", "order.placed.late", "invoice.placed", "orders.placed"],
        ),
        (
            "*.placed",
            ["order.placed", "invoice.placed"],
            ["placed", "order.placed.late", "a.b.placed"],
        ),
        (
            "order.#",
            ["order", "order.placed", "order.placed.late"],
            ["invoice.placed", "orders.placed"],
        ),
        ("#", ["order", "order.placed", "a.b.c.d", "OrderPlaced"], []),
        ("order.*.late", ["order.placed.late"], ["order.late", "order.placed.early"]),
    ],
)
async def test_patterns_follow_amqp_topic_rules(
    make_bus: Any, pattern: str, matching: list[str], not_matching: list[str]
) -> None:
    bus = await make_bus()
    seen: list[str] = []

    async def handler(event: Topic) -> None:
        seen.append(event.event_type)

    bus.subscribe(pattern, handler)
    for t in matching + not_matching:
        await bus.publish(Topic(t))
    await bus.drain()
    assert seen == matching


async def test_hash_pattern_matches_class_named_and_dict_events(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe("#", collector(seen, "all"))
    a = OrderPlaced("o-1")
    b = {"event_type": "payment.received", "amount": 3}
    await bus.publish(a)
    await bus.publish(b)
    await bus.drain()
    assert [e for _, e in seen] == [a, b]
    assert seen[1][1] is b


async def test_smaller_priority_numbers_run_first_and_ties_keep_subscription_order(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    order: list[str] = []

    def make(tag: str) -> Any:
        async def h(event: Any) -> None:
            order.append(tag)

        return h

    bus.subscribe(OrderPlaced, make("p5"), priority=5)
    bus.subscribe(OrderPlaced, make("p1-a"), priority=1)
    bus.subscribe(OrderEvent, make("p3"), priority=3)
    bus.subscribe("OrderPlaced", make("p1-b"))  # default priority is 1
    bus.subscribe(OrderPlaced, make("p1-c"), priority=1)
    bus.subscribe("#", make("p0"), priority=0)
    bus.subscribe(OrderPlaced, make("p10"), priority=10)
    await bus.publish(OrderPlaced("o-1"))
    await bus.drain()
    assert order == ["p0", "p1-a", "p1-b", "p1-c", "p3", "p5", "p10"]


async def test_priority_order_holds_for_mixed_sync_and_async_handlers(make_bus: Any) -> None:
    bus = await make_bus(workers=2)
    order: list[str] = []

    async def slow_async(event: Any) -> None:
        for _ in range(3):
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        order.append("async-2")

    def sync_1(event: Any) -> None:
        order.append("sync-1")

    def sync_3(event: Any) -> None:
        order.append("sync-3")

    bus.subscribe(OrderPlaced, sync_3, priority=3)
    bus.subscribe(OrderPlaced, slow_async, priority=2)
    bus.subscribe(OrderPlaced, sync_1, priority=1)
    await bus.publish(OrderPlaced("o-1"))
    await bus.drain()
    assert order == ["sync-1", "async-2", "sync-3"]


async def test_on_decorator_subscribes_and_returns_the_function(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[Any] = []

    @bus.on(OrderPlaced, priority=2)
    async def second(event: Any) -> None:
        seen.append("second")

    @bus.on(OrderPlaced)
    def first(event: Any) -> None:
        seen.append("first")

    assert callable(second) and second.__name__ == "second"
    assert first.__name__ == "first"
    await bus.publish(OrderPlaced("o-1"))
    await bus.drain()
    assert seen == ["first", "second"]


async def test_subscribing_after_a_type_was_published_reaches_later_events(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    seen: list[Any] = []
    bus.subscribe(OrderPlaced, collector(seen, "early"))
    await bus.publish(OrderPlaced("o-1"))
    await bus.drain()
    bus.subscribe(OrderEvent, collector(seen, "late-class"))
    bus.subscribe("OrderPlaced", collector(seen, "late-string"))
    bus.subscribe("#", collector(seen, "late-pattern"))
    await bus.publish(OrderPlaced("o-2"))
    await bus.drain()
    assert [(t, e.order_id) for t, e in seen] == [
        ("early", "o-1"),
        ("early", "o-2"),
        ("late-class", "o-2"),
        ("late-string", "o-2"),
        ("late-pattern", "o-2"),
    ]


async def test_unrouted_event_is_accepted_and_counted(make_bus: Any) -> None:
    bus = await make_bus()
    assert await bus.publish(Topic("nobody.listens")) is True
    await bus.drain()
    stats = bus.get_statistics()
    assert stats["events_published"] == 1
    assert stats["events_processed"] == 1


# ----------------------------------------------------------------- kinds of events


@dataclass
class DataclassDomainEvent(DomainEvent):
    account_id: str
    amount: int = 0


@dataclass(frozen=True)
class FrozenDomainEvent(DomainEvent):
    account_id: str
    tags: list[str] = field(default_factory=list)  # makes instances unhashable


@dataclass
class PlainDataclassEvent:
    account_id: str
    amount: int


@dataclass(frozen=True)
class FrozenPlainDataclassEvent:
    account_id: str


class PydanticEvent(pydantic.BaseModel):
    account_id: str
    amount: int = 0


class PydanticTypedEvent(pydantic.BaseModel):
    event_type: str = "account.opened"
    aggregate_id: str


class PlainObjectEvent:
    def __init__(self, account_id: str) -> None:
        self.account_id = account_id


class PlainDomainEvent(DomainEvent):
    def __init__(self, account_id: str) -> None:
        super().__init__()
        self.account_id = account_id


EVENT_FACTORIES = {
    "domain-plain": (PlainDomainEvent, lambda: PlainDomainEvent("a-1")),
    "domain-dataclass": (DataclassDomainEvent, lambda: DataclassDomainEvent("a-1", 5)),
    "domain-frozen-dataclass": (
        FrozenDomainEvent,
        lambda: FrozenDomainEvent("a-1", ["x"]),
    ),
    "plain-dataclass": (PlainDataclassEvent, lambda: PlainDataclassEvent("a-1", 5)),
    "plain-frozen-dataclass": (FrozenPlainDataclassEvent, lambda: FrozenPlainDataclassEvent("a")),
    "pydantic": (PydanticEvent, lambda: PydanticEvent(account_id="a-1", amount=2)),
    "plain-object": (PlainObjectEvent, lambda: PlainObjectEvent("a-1")),
}


@pytest.mark.parametrize("kind", list(EVENT_FACTORIES))
@pytest.mark.parametrize("workers", [1, 4])
async def test_any_kind_of_event_reaches_class_and_name_subscribers_as_the_same_object(
    make_bus: Any, kind: str, workers: int
) -> None:
    cls, make = EVENT_FACTORIES[kind]
    bus = await make_bus(workers=workers)
    seen: list[Any] = []
    bus.subscribe(cls, collector(seen, "class"))
    bus.subscribe(cls.__name__, collector(seen, "name"))
    event = make()
    assert await bus.publish(event) is True
    await bus.drain()
    assert [t for t, _ in seen] == ["class", "name"]
    assert all(e is event for _, e in seen)


async def test_dict_events_route_by_their_event_type_item_and_arrive_as_the_same_dict(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2)
    seen: list[Any] = []
    bus.subscribe("user.created", collector(seen, "exact"))
    bus.subscribe("user.*", collector(seen, "pattern"))
    bus.subscribe(dict, collector(seen, "dict-class"))
    created = {"event_type": "user.created", "aggregate_id": "u-1", "name": "Kim"}
    deleted = {"event_type": "user.deleted", "aggregate_id": "u-1"}
    await bus.publish(created)
    await bus.publish(deleted)
    await bus.drain()
    assert [(t, e["event_type"]) for t, e in seen] == [
        ("exact", "user.created"),
        ("pattern", "user.created"),
        ("dict-class", "user.created"),
        ("pattern", "user.deleted"),
        ("dict-class", "user.deleted"),
    ]
    assert seen[0][1] is created


async def test_pydantic_event_type_field_is_its_type_key(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    seen: list[Any] = []
    bus.subscribe("account.opened", collector(seen, "s"))
    e = PydanticTypedEvent(aggregate_id="a-9")
    await bus.publish(e)
    await bus.drain()
    assert seen == [("s", e)] and seen[0][1] is e


def test_domain_event_gives_identity_fields_to_every_flavour() -> None:
    for make in (
        lambda: PlainDomainEvent("a-1"),
        lambda: DataclassDomainEvent("a-1"),
        lambda: FrozenDomainEvent("a-1"),
    ):
        e = make()
        assert uuid.UUID(e.event_id).version == 7
        assert str(uuid.UUID(e.event_id)) == e.event_id  # the canonical lower-case form
        assert e.event_id == e.event_id  # stable once read
        assert e.occurred_at.tzinfo is not None
        assert e.event_type == type(e).__name__
        assert e.aggregate_id is None
        assert e.event_version == 1 and e.version == 1
        assert e.correlation_id == e.event_id
        assert e.causation_id is None
    assert PlainDomainEvent("a").event_id != PlainDomainEvent("a").event_id


def _uuid7_ms(event_id: str) -> int:
    u = uuid.UUID(event_id)
    assert (u.version, u.variant) == (7, uuid.RFC_4122), event_id
    return u.int >> 80  # the first 48 bits: Unix time in milliseconds


async def test_event_ids_are_uuid7_made_at_first_need_and_time_ordered(make_bus: Any) -> None:
    # README, "Events": the id is a UUID version 7 (time-ordered) made when first needed.
    before = int(time.time() * 1000)
    ids = [PlainDomainEvent("a").event_id for _ in range(2000)]  # several ids per millisecond
    after = int(time.time() * 1000)
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids), "ids made one after another must sort in the order made"
    stamps = [_uuid7_ms(i) for i in ids]
    assert before <= stamps[0] and stamps[-1] <= after + 1  # +1: a full counter moves the ms on

    # An event without an id of its own (a dict) gets one when the bus needs it.
    bus = await make_bus()
    seen: list[str] = []

    async def handler(event: Any) -> None:
        env = oxbus.current_envelope()
        assert env is not None
        seen.append(env.event_id)

    bus.subscribe("routing.no_id", handler)
    start = int(time.time() * 1000)
    await bus.publish_many({"event_type": "routing.no_id", "n": n} for n in range(50))
    await bus.drain()
    assert len(seen) == 50 == len(set(seen))
    assert all(start <= _uuid7_ms(i) <= int(time.time() * 1000) + 1 for i in seen)
    assert seen == sorted(seen)
