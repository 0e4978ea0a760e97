"""How the bus waits: ``drain()`` until every accepted event is handled, ``stop()`` for the
handler calls still running, ``wait_for()`` for the first matching event; and the refusal of
a wait from inside a handler, which would wait for that handler itself."""

from __future__ import annotations

import asyncio
from typing import Any

from oxbus._oxbus import BusCore, current_envelope
from oxbus.errors import ReentrantCall

__all__ = ["drain", "refuse_inside_handler", "settle", "wait_for_event"]


async def drain(core: BusCore, timeout: float | None) -> None:
    """Waits until every accepted event has been handled, retries included; raises
    ``TimeoutError`` (saying what is left) after ``timeout`` seconds."""
    fut = core.drain_waiter()
    if fut is None:
        return
    try:
        await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        s = core.statistics()
        raise TimeoutError(
            f"drain timed out after {timeout}s: {s['queue_size']} queued, "
            f"{s['in_flight']} in handlers, {s['retry_queue_size']} waiting to retry"
        ) from None


async def settle(core: BusCore, timeout: float | None) -> None:
    """Gives the handler calls still running (intake closed, the queue discarded) up to
    ``timeout`` seconds to finish; returns then, whether they did or not."""
    running = core.drain_waiter()
    if running is not None:
        try:
            await asyncio.wait_for(running, timeout)
        except asyncio.TimeoutError:
            pass


async def wait_for_event(
    core: BusCore, fut: asyncio.Future[Any], wid: int, event_type: Any, timeout: float | None
) -> Any:
    """What ``bus.wait_for`` returns: the event ``fut`` (of waiter ``wid``) resolves to, or
    ``TimeoutError`` after ``timeout`` seconds; the waiter is removed either way."""
    try:
        return await asyncio.wait_for(fut, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(
            f"no {getattr(event_type, '__name__', event_type)!s} event within {timeout}s"
        ) from None
    finally:
        core.remove_waiter(wid)


def refuse_inside_handler(what: str, started: bool) -> None:
    """Raises ``ReentrantCall`` when ``what()`` (a wait for every handler) is called from
    inside a handler of a ``started`` bus."""
    env = current_envelope()
    if env is not None and started:
        raise ReentrantCall(
            f"{what}() called from inside a handler (of {env.event_type}) would wait "
            "for that handler itself; call it from outside handlers"
        )
