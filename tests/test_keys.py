"""Ordering keys have one form on every backend (issue 11, item 2).

A key is canonical before it is used or written: an Enum member is its value, a UUID its
text, a list or tuple a tuple of canonical parts. In memory any hashable key orders events;
a bus that writes its events (durable log, Redis) also needs the key back from JSON, so there
a key must be a str, int, float, bool, UUID, Enum member or a tuple of these, and anything else
is refused with ``InvalidEvent`` before a byte is written.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from oxbus import DomainEvent, EventBus, SqliteEventStore, current_envelope
from oxbus.errors import InvalidEvent


class Desk(enum.Enum):
    FX = "fx"


async def test_a_tuple_key_survives_a_restart_of_a_durable_bus(tmp_path: Path) -> None:
    # The tuple was written as a JSON list; every restart used to fail with InvalidEvent.
    db = str(tmp_path / "log.db")
    bus = EventBus(store=db, workers=2)  # nobody subscribed yet: the events wait in the log
    async with bus:
        await bus.publish({"event_type": "trade", "aggregate_id": ("t", 42), "n": 1})
        await bus.publish({"event_type": "trade", "aggregate_id": ["t", 42], "n": 2})
        await bus.publish(
            {"event_type": "trade", "aggregate_id": (Desk.FX, uuid.UUID(int=7)), "n": 3}
        )

    seen: list[tuple[Any, int]] = []
    restarted = EventBus(store=db, workers=2)
    restarted.subscribe(
        "trade", lambda e: seen.append((e["aggregate_id"], e["n"])), name="book",
        from_beginning=True,
    )
    async with restarted:
        await restarted.drain()
    # One key for the tuple and the list: handled in publish order.
    assert [n for k, n in seen if k == ["t", 42]] == [1, 2]
    assert sorted(seen, key=lambda kn: kn[1]) == [
        (["t", 42], 1),
        (["t", 42], 2),
        (["fx", "00000000-0000-0000-0000-000000000007"], 3),
    ]


@pytest.mark.parametrize(
    "key",
    [{"a": 1}, {1, 2}, object(), ("ok", object()), float("nan")],
    ids=["dict", "set", "object", "tuple-with-object", "nan"],
)
async def test_a_key_the_log_cannot_give_back_is_refused_before_anything_is_written(
    tmp_path: Path, key: Any
) -> None:
    db = str(tmp_path / "log.db")
    bus = EventBus(store=db, workers=2)
    seen: list[int] = []
    bus.subscribe("trade", lambda e: seen.append(e["n"]), name="book")
    async with bus:
        with pytest.raises(InvalidEvent, match="cannot be written|unhashable") as e:
            await bus.publish({"event_type": "trade", "n": 1}, key=key)
        assert type(key).__name__ in str(e.value)
        with pytest.raises(InvalidEvent):
            await bus.publish({"event_type": "trade", "aggregate_id": key, "n": 2})
        good = [{"event_type": "trade", "aggregate_id": f"k{i}", "n": 10 + i} for i in range(3)]
        with pytest.raises(InvalidEvent):
            await bus.publish_many([*good, {"event_type": "trade", "aggregate_id": key, "n": 3}])
        await bus.drain()
        assert bus.get_statistics()["events_published"] == 0
    assert seen == []
    with SqliteEventStore(db) as store:
        assert await store.read_all() == []  # nothing reached the log


async def test_in_memory_any_hashable_key_orders_and_lists_equal_tuples(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    seen: list[int] = []
    bus.subscribe("step", lambda e: seen.append(e["n"]))

    class AccountId:  # a value object: hashable, not JSON
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            return isinstance(other, AccountId)

    await bus.publish({"event_type": "step", "n": 1}, key=AccountId())
    await bus.publish({"event_type": "step", "n": 2}, key=["a", 1])
    await bus.publish({"event_type": "step", "n": 3}, key=("a", 1))
    with pytest.raises(InvalidEvent, match=r"\{.a.: 1\} \(type dict\) is unhashable"):
        await bus.publish({"event_type": "step", "n": 4}, key={"a": 1})
    await bus.drain()
    assert sorted(seen) == [1, 2, 3]


class KeyByProperty(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class KeyByDefault(DomainEvent):
    pass


async def test_the_key_follows_aggregate_id_even_when_the_class_is_patched(
    make_bus: Any,
) -> None:
    # A property that only returns an attribute is read as that attribute: the same value,
    # also after the class changed its aggregate_id.
    bus = await make_bus(workers=4)
    keys: list[Any] = []
    bus.subscribe(KeyByProperty, lambda e: keys.append(current_envelope().key))
    bus.subscribe(KeyByDefault, lambda e: keys.append(current_envelope().key))
    await bus.publish(KeyByProperty("o-1"))
    await bus.drain()
    original = KeyByProperty.aggregate_id
    KeyByProperty.aggregate_id = property(lambda self: self.order_id.upper())  # type: ignore[assignment, method-assign]
    try:
        await bus.publish(KeyByProperty("o-2"))
        await bus.drain()
    finally:
        KeyByProperty.aggregate_id = original  # type: ignore[method-assign]
    await bus.publish(KeyByProperty("o-3"))
    plain, own = KeyByDefault(), KeyByDefault()
    own.__dict__["aggregate_id"] = "mine"
    await bus.publish(plain)
    await bus.publish(own)
    await bus.drain()
    assert keys == ["o-1", "O-2", "o-3", None, "mine"]
    assert plain.aggregate_id is None and own.aggregate_id == "mine"


@dataclass(frozen=True)
class Shipped(DomainEvent):
    order_id: str
    aggregate_id: str


@dataclass
class PlainShipped:
    aggregate_id: Any


class Slotted:
    __slots__ = ("aggregate_id",)

    def __init__(self, key: Any) -> None:
        self.aggregate_id = key


class NoKey:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 1


async def test_a_dataclass_field_or_an_instance_attribute_is_the_key(make_bus: Any) -> None:
    # Read from the instance's own dictionary (a DomainEvent dataclass, a plain dataclass),
    # through the class's slot, or absent (no __dict__, no aggregate_id): no key.
    bus = await make_bus(workers=4)
    keys: list[Any] = []
    for cls in (Shipped, PlainShipped, Slotted, NoKey):
        bus.subscribe(cls, lambda e: keys.append(current_envelope().key))
    for event in (Shipped("o-1", "a-1"), PlainShipped("a-2"), PlainShipped(None),
                  Slotted("a-3"), NoKey()):
        await bus.publish(event)
    await bus.drain()
    assert sorted(map(repr, keys)) == ["'a-1'", "'a-2'", "'a-3'", "None", "None"]


async def test_a_property_reading_a_missing_attribute_is_refused_at_publish(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2)
    bus.subscribe(KeyByProperty, lambda e: None)
    broken = KeyByProperty("o-1")
    del broken.order_id
    with pytest.raises(
        InvalidEvent,
        match=r"reading aggregate_id of a KeyByProperty event raised AttributeError: "
        r".*order_id",
    ):
        await bus.publish(broken)
    assert bus.get_statistics()["events_published"] == 0
