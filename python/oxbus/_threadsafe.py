"""``bus.publish_threadsafe``: publishing from other threads, with a
``concurrent.futures.Future`` that never stays pending (the bus stopping or its loop ending
fails it with ``BusClosed``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from typing import Any, Callable, Coroutine

from oxbus.errors import BusClosed


class ThreadsafePublisher:
    """The futures of one bus's ``publish_threadsafe`` calls whose event has not reached the
    loop yet."""

    def __init__(self) -> None:
        self._pending: set[concurrent.futures.Future[bool]] = set()
        self._guard = threading.Lock()

    def submit(
        self, loop: asyncio.AbstractEventLoop, publish: Callable[[], Coroutine[Any, Any, bool]]
    ) -> concurrent.futures.Future[bool]:
        """Runs ``publish()`` as a task on ``loop``; its outcome becomes the future's."""
        # The caller's context travels with the event: a sync handler running in the thread
        # pool publishes with its envelope, so correlation is inherited.
        ctx = contextvars.copy_context()
        result: concurrent.futures.Future[bool] = concurrent.futures.Future()
        pending = self._pending

        def relay(task: asyncio.Task[bool]) -> None:
            if task.cancelled():  # the loop is ending (its tasks are cancelled)
                result.set_exception(
                    BusClosed("the bus's event loop ended before this event was accepted")
                )
            elif task.exception() is not None:
                result.set_exception(task.exception())
            else:
                result.set_result(task.result())

        def start() -> None:
            with self._guard:
                if result not in pending:  # failed by stop() or the loop's end already
                    return
                pending.discard(result)
            if not result.set_running_or_notify_cancel():
                return
            try:
                task: asyncio.Task[bool] = ctx.run(loop.create_task, publish())
            except BaseException as e:  # noqa: BLE001 - handed to the caller's future
                result.set_exception(e)
                return
            task.add_done_callback(relay)

        with self._guard:
            pending.add(result)
        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop is closed
            with self._guard:
                pending.discard(result)
            raise BusClosed(
                "the bus's event loop is closed: publish_threadsafe cannot reach it"
            ) from None
        return result

    def fail_all(self) -> None:
        """Fails with ``BusClosed`` every future whose event has not reached the loop yet:
        the bus stops, or its loop ends, so it never will."""
        with self._guard:
            waiting = list(self._pending)
            self._pending.clear()
        for fut in waiting:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(
                    BusClosed("the bus stopped before this event reached its loop; not accepted")
                )
