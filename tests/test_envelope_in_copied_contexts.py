"""What a handler's copies of its context see: the envelope of the event being handled when the
copy was made, whatever the worker handled since. (The worker changes the envelope in place when
no copy shares it, so these are the cases where it must not.)"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import oxbus
from oxbus import EventBus

OTHER = contextvars.ContextVar("ctx_test_other", default=0)
MANY = [contextvars.ContextVar(f"ctx_test_many_{i}", default=0) for i in range(40)]


class CtxEvent:
    def __init__(self, n: int) -> None:
        self.n = n
        self.event_id = f"ctx-{n}"


def envelope_id() -> str | None:
    env = oxbus.current_envelope()
    return None if env is None else env.event_id


async def _run(bus: EventBus, n: int) -> None:
    for i in range(n):
        await bus.publish(CtxEvent(i))
    await bus.drain()


async def test_a_context_copied_in_a_handler_keeps_its_envelope_after_later_events(
    make_bus: Any,
) -> None:
    bus: EventBus = await make_bus()
    copies: dict[int, contextvars.Context] = {}

    def handler(event: CtxEvent) -> None:
        if event.n % 7 == 3:
            copies[event.n] = contextvars.copy_context()

    bus.subscribe(CtxEvent, handler)
    await _run(bus, 100)
    assert copies
    assert {n: ctx.run(envelope_id) for n, ctx in copies.items()} == {
        n: f"ctx-{n}" for n in copies
    }


async def test_callbacks_and_tasks_started_in_handlers_see_their_own_envelope(
    make_bus: Any,
) -> None:
    bus: EventBus = await make_bus()
    seen: list[tuple[int, str | None]] = []
    tasks: list[asyncio.Task[None]] = []

    async def later(n: int) -> None:
        seen.append((n, envelope_id()))

    async def handler(event: CtxEvent) -> None:
        loop = asyncio.get_running_loop()
        if event.n % 3 == 0:
            loop.call_soon(lambda n=event.n: seen.append((n, envelope_id())))
        elif event.n % 3 == 1:
            tasks.append(asyncio.create_task(later(event.n)))

    bus.subscribe(CtxEvent, handler)
    await _run(bus, 60)
    await asyncio.gather(*tasks)
    assert len(seen) == 40
    assert all(env == f"ctx-{n}" for n, env in seen), seen


async def test_a_copy_that_sets_another_variable_keeps_its_envelope(make_bus: Any) -> None:
    bus: EventBus = await make_bus()
    copies: dict[int, contextvars.Context] = {}

    def handler(event: CtxEvent) -> None:
        if event.n % 5 == 0:
            ctx = contextvars.copy_context()
            ctx.run(OTHER.set, event.n)  # the copy's mapping now differs from the worker's
            copies[event.n] = ctx
        if event.n % 11 == 0:
            OTHER.set(-event.n)  # and the worker's own context changes too

    bus.subscribe(CtxEvent, handler)
    await _run(bus, 60)
    assert {n: (ctx.run(envelope_id), ctx[OTHER]) for n, ctx in copies.items()} == {
        n: (f"ctx-{n}", n) for n in copies
    }


async def test_copies_keep_their_envelope_in_a_context_with_many_variables(
    make_bus: Any,
) -> None:
    # Started from a context holding 40 variables: the envelope's variable may then sit deep
    # in the context's mapping, shared with copies that changed another variable.
    async def scenario() -> dict[int, tuple[str | None, int]]:
        for i, var in enumerate(MANY):
            var.set(i + 1)
        bus: EventBus = await make_bus()
        copies: dict[int, contextvars.Context] = {}

        def handler(event: CtxEvent) -> None:
            if event.n % 4 == 0:
                ctx = contextvars.copy_context()
                ctx.run(MANY[event.n % 40].set, -event.n)
                copies[event.n] = ctx

        bus.subscribe(CtxEvent, handler)
        await _run(bus, 80)
        return {n: (ctx.run(envelope_id), ctx[MANY[n % 40]]) for n, ctx in copies.items()}

    got = await contextvars.copy_context().run(asyncio.create_task, scenario())
    assert got == {n: (f"ctx-{n}", -n) for n in range(0, 80, 4)}


async def test_each_handler_sees_its_own_envelope_under_a_task_factory_without_context() -> None:
    """A loop whose task factory takes no ``context=`` still runs the workers (the bus falls
    back to a task without one), and every handler sees its own event's envelope."""
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(lambda loop, coro: asyncio.Task(coro, loop=loop))
    try:
        bus = EventBus(workers=2)
        seen: list[tuple[int, str | None]] = []

        async def handler(e: CtxEvent) -> None:
            seen.append((e.n, envelope_id()))
            await asyncio.sleep(0)  # sleep-ok: a real suspension between events

        bus.subscribe(CtxEvent, handler)
        async with bus:
            await _run(bus, 50)
    finally:
        loop.set_task_factory(previous)
    assert sorted(seen) == [(i, f"ctx-{i}") for i in range(50)]


async def test_each_handler_sees_its_own_envelope_in_the_workers_own_context(
    make_bus: Any,
) -> None:
    """Handlers that neither copy nor change the context: the worker changes the envelope in
    place (the check without a copy of the context, Python 3.11+), and each sees its own."""
    bus: EventBus = await make_bus()
    seen: list[tuple[int, str | None]] = []

    def handler(e: CtxEvent) -> None:
        seen.append((e.n, envelope_id()))

    bus.subscribe(CtxEvent, handler)
    await _run(bus, 200)
    assert seen == [(i, f"ctx-{i}") for i in range(200)]
