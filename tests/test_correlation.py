"""Correlation: events published while a handler runs inherit its correlation id and carry
the handled event's id as causation id, on ``DomainEvent`` attributes and in
``oxbus.current_envelope()`` (None outside handlers)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import pytest

import oxbus
from oxbus import DomainEvent


class Root(DomainEvent):
    def __init__(self, name: str = "root") -> None:
        super().__init__()
        self.name = name


class Child(DomainEvent):
    def __init__(self, name: str = "child") -> None:
        super().__init__()
        self.name = name


class Grandchild(DomainEvent):
    pass


@dataclass(frozen=True)
class FrozenChild(DomainEvent):
    name: str


class PlainChild:
    def __init__(self, n: int) -> None:
        self.n = n


def snapshot() -> dict[str, Any] | None:
    env = oxbus.current_envelope()
    if env is None:
        return None
    return {
        "event_id": env.event_id,
        "correlation_id": env.correlation_id,
        "causation_id": env.causation_id,
        "subscription": env.subscription,
        "attempt": env.attempt,
    }


async def test_current_envelope_is_none_outside_handlers(make_bus: Any) -> None:
    bus = await make_bus()
    assert oxbus.current_envelope() is None

    async def handler(event: Root) -> None:
        pass

    bus.subscribe(Root, handler)
    await bus.publish(Root())
    await bus.drain()
    assert oxbus.current_envelope() is None


async def test_root_event_correlation_is_its_own_id_and_has_no_cause(make_bus: Any) -> None:
    bus = await make_bus()
    seen: dict[str, Any] = {}

    async def handler(event: Root) -> None:
        seen["env"] = snapshot()

    bus.subscribe(Root, handler, name="root-handler")
    root = Root()
    await bus.publish(root)
    await bus.drain()
    assert seen["env"] == {
        "event_id": root.event_id,
        "correlation_id": root.event_id,
        "causation_id": None,
        "subscription": "root-handler",
        "attempt": 1,
    }
    assert root.correlation_id == root.event_id
    assert root.causation_id is None


@pytest.mark.parametrize("workers", [1, 4])
async def test_events_published_in_a_handler_inherit_correlation_and_name_their_cause(
    make_bus: Any, workers: int
) -> None:
    bus = await make_bus(workers=workers)
    envs: dict[str, Any] = {}
    children: list[Child] = []
    grandchildren: list[Grandchild] = []

    async def on_root(event: Root) -> None:
        envs["root"] = snapshot()
        child = Child()
        children.append(child)
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        await bus.publish(child)

    async def on_child(event: Child) -> None:
        envs["child"] = snapshot()
        g = Grandchild()
        grandchildren.append(g)
        await bus.publish(g)

    async def on_grandchild(event: Grandchild) -> None:
        envs["grandchild"] = snapshot()

    bus.subscribe(Root, on_root)
    bus.subscribe(Child, on_child)
    bus.subscribe(Grandchild, on_grandchild)
    root = Root()
    await bus.publish(root)
    await bus.drain()
    (child,) = children
    (grandchild,) = grandchildren
    assert envs["child"]["correlation_id"] == root.event_id
    assert envs["child"]["causation_id"] == root.event_id
    assert envs["child"]["event_id"] == child.event_id
    assert envs["grandchild"]["correlation_id"] == root.event_id
    assert envs["grandchild"]["causation_id"] == child.event_id
    # The same values on the DomainEvent attributes.
    assert (child.correlation_id, child.causation_id) == (root.event_id, root.event_id)
    assert (grandchild.correlation_id, grandchild.causation_id) == (root.event_id, child.event_id)


async def test_every_event_of_a_publish_many_in_a_handler_inherits_its_correlation(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    children = [Child("a"), Child("b"), Child("c")]
    seen: dict[str, dict[str, Any] | None] = {}

    async def on_root(event: Root) -> None:
        assert await bus.publish_many(children) == 3

    async def on_child(event: Child) -> None:
        seen[event.name] = snapshot()

    bus.subscribe(Root, on_root)
    bus.subscribe(Child, on_child)
    root = Root()
    await bus.publish(root)
    await bus.publish_many([Child("outside")])
    await bus.drain()
    assert sorted(seen) == ["a", "b", "c", "outside"]
    for child in children:
        env = seen[child.name]
        assert env is not None
        assert (env["event_id"], env["correlation_id"], env["causation_id"]) == (
            child.event_id,
            root.event_id,
            root.event_id,
        )
        assert (child.correlation_id, child.causation_id) == (root.event_id, root.event_id)
    outside = seen["outside"]
    assert outside is not None
    assert (outside["correlation_id"], outside["causation_id"]) == (outside["event_id"], None)


async def test_sync_handler_publishing_via_create_task_inherits_correlation(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    tasks: list[asyncio.Task[bool]] = []
    child_env: dict[str, Any] = {}
    child = Child()

    def on_root(event: Root) -> None:
        tasks.append(asyncio.get_running_loop().create_task(bus.publish(child)))

    async def on_child(event: Child) -> None:
        child_env.update(snapshot() or {})

    bus.subscribe(Root, on_root)
    bus.subscribe(Child, on_child)
    root = Root()
    await bus.publish(root)
    await bus.drain()
    assert await asyncio.gather(*tasks) == [True]
    await bus.drain()
    assert child_env["correlation_id"] == root.event_id
    assert child_env["causation_id"] == root.event_id
    assert child.causation_id == root.event_id


async def test_publish_through_create_task_inside_a_handler_inherits_correlation(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2)
    tasks: list[asyncio.Task[bool]] = []
    child_env: dict[str, Any] = {}
    child = Child()

    async def on_root(event: Root) -> None:
        tasks.append(asyncio.create_task(bus.publish(child)))

    async def on_child(event: Child) -> None:
        child_env.update(snapshot() or {})

    bus.subscribe(Root, on_root)
    bus.subscribe(Child, on_child)
    root = Root()
    await bus.publish(root)
    await bus.drain()
    assert await asyncio.gather(*tasks) == [True]  # the task may run after the handler ended
    await bus.drain()
    assert child_env["correlation_id"] == root.event_id
    assert child_env["causation_id"] == root.event_id
    assert (child.correlation_id, child.causation_id) == (root.event_id, root.event_id)


async def test_frozen_dataclass_child_shows_inherited_ids(make_bus: Any) -> None:
    bus = await make_bus()
    children: list[FrozenChild] = []

    async def on_root(event: Root) -> None:
        c = FrozenChild("frozen")
        children.append(c)
        await bus.publish(c)

    async def on_child(event: FrozenChild) -> None:
        pass

    bus.subscribe(Root, on_root)
    bus.subscribe(FrozenChild, on_child)
    root = Root()
    await bus.publish(root)
    await bus.drain()
    (child,) = children
    assert child.correlation_id == root.event_id
    assert child.causation_id == root.event_id


async def test_plain_and_dict_events_carry_correlation_in_the_envelope(make_bus: Any) -> None:
    bus = await make_bus()
    envs: list[dict[str, Any]] = []

    async def on_root(event: Root) -> None:
        await bus.publish(PlainChild(1))
        await bus.publish({"event_type": "corr.dict", "event_id": "dict-1"})

    async def on_plain(event: PlainChild) -> None:
        envs.append(snapshot() or {})

    async def on_dict(event: dict[str, Any]) -> None:
        envs.append(snapshot() or {})

    bus.subscribe(Root, on_root)
    bus.subscribe(PlainChild, on_plain)
    bus.subscribe("corr.dict", on_dict)
    root = Root()
    await bus.publish(root)
    await bus.drain()
    assert len(envs) == 2
    for env in envs:
        assert env["correlation_id"] == root.event_id
        assert env["causation_id"] == root.event_id
    assert envs[1]["event_id"] == "dict-1"
    assert isinstance(envs[0]["event_id"], str) and envs[0]["event_id"]


async def test_publish_correlation_id_names_the_chain_on_envelope_and_event(
    make_bus: Any,
) -> None:
    # DESIGN.md: "a root event's correlation_id is its own event_id unless
    # publish(correlation_id=...) says otherwise", and "a DomainEvent's correlation_id and
    # causation_id attributes show the same values" as the envelope.
    bus = await make_bus()
    envs: dict[str, Any] = {}
    children: list[Child] = []

    async def on_root(event: Root) -> None:
        envs["root"] = snapshot()
        c = Child()
        children.append(c)
        await bus.publish(c)

    async def on_child(event: Child) -> None:
        envs["child"] = snapshot()

    bus.subscribe(Root, on_root)
    bus.subscribe(Child, on_child)
    root = Root()
    await bus.publish(root, correlation_id="request-42")
    await bus.drain()
    assert envs["root"]["correlation_id"] == "request-42"
    assert envs["child"]["correlation_id"] == "request-42"
    assert children[0].correlation_id == "request-42"
    assert root.correlation_id == "request-42"


async def test_threaded_sync_handler_sees_its_envelope(make_bus: Any) -> None:
    # DESIGN.md: "inside a handler oxbus.current_envelope() returns what is being handled",
    # whichever way sync handlers run.
    bus = await make_bus(sync_handlers="thread")
    seen: list[Any] = []

    def handler(event: Root) -> None:
        seen.append(snapshot())

    bus.subscribe(Root, handler)
    root = Root()
    await bus.publish(root)
    await bus.drain()
    assert seen[0] is not None
    assert seen[0]["event_id"] == root.event_id


async def test_concurrent_handlers_each_see_their_own_envelope(make_bus: Any) -> None:
    bus = await make_bus(workers=4)
    mismatches: list[Any] = []

    async def handler(event: Root) -> None:
        for _ in range(3):
            env = oxbus.current_envelope()
            if env is None or env.event_id != event.event_id:
                mismatches.append(event.name)
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus

    bus.subscribe(Root, handler)
    for i in range(100):
        await bus.publish(Root(f"r{i}"))
    await bus.drain()
    assert mismatches == []


async def test_threaded_sync_handler_publishing_threadsafe_inherits_correlation(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2, sync_handlers="thread")
    child = Child()
    child_env: dict[str, Any] = {}

    def on_root(event: Root) -> None:
        assert bus.publish_threadsafe(child).result(timeout=10) is True

    async def on_child(event: Child) -> None:
        child_env.update(snapshot() or {})

    bus.subscribe(Root, on_root)
    bus.subscribe(Child, on_child)
    root = Root()
    await bus.publish(root)
    await bus.drain(timeout=10)
    assert child_env["correlation_id"] == root.event_id
    assert child_env["causation_id"] == root.event_id
