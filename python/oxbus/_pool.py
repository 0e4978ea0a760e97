"""The thread pool of sync handlers (``EventBus(sync_handlers="thread")``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import queue
import threading
from typing import Any, Callable


class ElasticPool(concurrent.futures.Executor):
    """A pool of *daemon* threads that replaces threads stuck in calls that overran their
    timeout, up to ``size`` replacements at a time, so timed-out sync handlers cannot starve it.

    ``ThreadPoolExecutor``'s threads are joined when the interpreter exits, so one handler
    stuck for ever (a hung socket, a deadlock) kept the process alive after ``stop()``. These
    threads are daemons: such a handler is abandoned, never interrupted (Python cannot stop a
    thread), and ends with the process.
    """

    def __init__(self, size: int, prefix: str) -> None:
        self.size = size
        self.abandoned = 0
        self.abandoned_total = 0
        self._max_workers = size
        self._prefix = prefix
        self._guard = threading.Lock()
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one permit per thread waiting for work
        self._threads: set[threading.Thread] = set()
        self._started = 0
        self._shutdown = False

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        with self._guard:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            self._work.put((fut, fn, args, kwargs))
            if not self._idle.acquire(timeout=0) and len(self._threads) < self._max_workers:
                self._started += 1
                t = threading.Thread(
                    target=self._run, name=f"{self._prefix}_{self._started}", daemon=True
                )
                self._threads.add(t)
                t.start()
            return fut

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:  # shutdown
                break
            fut, fn, args, kwargs = item
            del item
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as e:  # noqa: BLE001 - handed to the waiting future
                    fut.set_exception(e)
                else:
                    fut.set_result(result)
            del fut, fn, args, kwargs  # no reference to the last call while idle
            self._idle.release()
        with self._guard:
            self._threads.discard(threading.current_thread())

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._guard:
            self._shutdown = True
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        if wait:
            for t in threads:
                t.join()

    def abandon(self) -> None:
        """A call overran its timeout: its thread is written off; allow one replacement."""
        with self._guard:
            self.abandoned += 1
            self.abandoned_total += 1
            if self._max_workers < 2 * self.size:
                self._max_workers += 1

    def release(self) -> None:
        """An abandoned call returned after all: its thread is back."""
        with self._guard:
            self.abandoned -= 1
            if self._max_workers > self.size:
                self._max_workers -= 1


async def call_with_timeout(
    pool: ElasticPool | None, target: Any, event: Any, timeout: float, threaded: bool, name: str
) -> Any:
    """A handler call with a timeout: async ones are cancelled; a thread-pool call cannot
    be, so its thread is abandoned and the pool may start a replacement."""
    cf: concurrent.futures.Future[Any] | None = None
    if threaded:
        assert pool is not None
        cf = pool.submit(contextvars.copy_context().run, target, event)
        aw: Any = asyncio.wrap_future(cf)
    else:
        aw = target
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        if cf is not None and not cf.done():
            assert pool is not None
            pool.abandon()
            cf.add_done_callback(lambda _: pool.release())
        raise TimeoutError(f"handler {name} took longer than its timeout of {timeout}s") from None
