"""The bus's tasks: its workers, each started in the context its task runs in and cancelled
at ``stop()`` (abandoned, with an error logged, when it does not end), and its background
store bookkeeping, kept referenced until it ends."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from oxbus._oxbus import BusCore, Worker

__all__ = ["Background", "cancel_workers", "start_worker"]

logger = logging.getLogger("oxbus")


def start_worker(
    loop: asyncio.AbstractEventLoop, core: BusCore, index: int, name: str
) -> asyncio.Task[Any]:
    """A worker's task. Given the context its task runs in (``create_task(context=)``,
    Python 3.11+; a loop or task factory without it gets none), the worker checks its
    envelope's context variable without copying the context on every event."""
    if sys.version_info >= (3, 11):
        ctx = contextvars.copy_context()
        try:
            return loop.create_task(Worker(core, index, ctx), name=name, context=ctx)
        except TypeError:  # a loop or a task factory that takes no context
            pass
    return loop.create_task(Worker(core, index), name=name)


async def cancel_workers(
    tasks: list[asyncio.Task[Any]], timeout: float, on_done: Callable[[asyncio.Task[Any]], object]
) -> int:
    """Cancels the worker ``tasks`` and gives them ``timeout`` seconds to end: a handler
    that swallows ``CancelledError`` would keep its worker (and ``stop()``) waiting for
    ever. The ones still running then are abandoned (``on_done`` removed from them), with
    an error logged; returns how many."""
    for t in tasks:
        t.cancel()
    _, stuck = await asyncio.wait(tasks, timeout=timeout) if tasks else ((), ())
    for t in stuck:
        t.remove_done_callback(on_done)
        logger.error(
            "stop: %s did not end after it was cancelled (a handler swallowed "
            "CancelledError?); abandoned", t.get_name(),
        )
    return len(stuck)


class Background:
    """The bus's store bookkeeping, run in the background: ``spawn(aw)``; ``await wait()``
    at ``stop()``."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, aw: Awaitable[Any]) -> None:
        """Runs store bookkeeping in the background, keeping a reference until it ends."""

        async def run() -> None:
            try:
                await aw
            except Exception:
                logger.exception("event store bookkeeping failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Waits until the bookkeeping started so far has ended (its errors are logged)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
