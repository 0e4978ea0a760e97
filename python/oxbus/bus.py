"""``EventBus``: the public bus. A thin Python shell around the Rust engine (``BusCore``).

The engine owns the queue, the per-key lanes, routing, statistics and health; workers are
native coroutines run as asyncio tasks. This module adds what is naturally Python: the
asyncio glue (start/stop/drain/wait_for), subscriptions' checks, and the thread-side
publisher. Where events travel is the transport's backend (``oxbus.backends``); failures
and dead letters are kept by ``oxbus.failures`` and ``oxbus.dead_letters``; the workers' tasks
by ``oxbus._workers``. The waits are ``oxbus._waiting``'s, the reports ``oxbus._reports``'s.
"""

from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import functools
import logging
import os
from enum import Enum
from typing import Any, Awaitable, Callable, Iterable, TypeVar, Union, overload

from oxbus._oxbus import BusCore, Publish, RetryPolicy, encode_json, publisher, publishing
from oxbus import _reports, _waiting
from oxbus import heartbeat as _heartbeat
from oxbus import log as _log  # noqa: F401 - puts the correlation fields on the "oxbus" logger
from oxbus._pool import ElasticPool, call_with_timeout
from oxbus._saga_manager import SagaManager, Sagas
from oxbus._threadsafe import ThreadsafePublisher
from oxbus._workers import Background, cancel_workers, start_worker
from oxbus.backends import backend_for, store_of
from oxbus.config import BusSettings, CircuitBreaker, seconds as _timeout
from oxbus.dead_letters import DeadLetters
from oxbus.failures import FailureBook
from oxbus.saga import Saga
from oxbus.store import SqliteEventStore
from oxbus.subscription import (
    Subscription,
    check_options,
    is_async as _is_async,
)
from oxbus.transports import URL_KEYWORDS, Transport, TransportSpec, resolve
from oxbus.errors import BusNotStarted, ConfigurationError, InvalidEvent

__all__ = ["EventBus"]

# What ``bus.publish(e)`` returns on an in-memory bus is a coroutine to asyncio
# (``asyncio.iscoroutine``, ``create_task``, ``gather``), as ``async def`` results are.
collections.abc.Coroutine.register(Publish)

logger = logging.getLogger("oxbus")

Handler = Callable[[Any], Union[Awaitable[Any], Any]]
H = TypeVar("H", bound=Handler)
S = TypeVar("S", bound="type[Saga]")
Target = Any  # a class, a type string or pattern, or an Enum member
E = TypeVar("E")
R = TypeVar("R")
Named = str | Enum  # a type string, pattern or Enum member: says nothing of the event's class


class EventBus:
    """An asyncio event bus with a Rust engine.

    ```python
    bus = EventBus(workers=4)
    bus.subscribe(OrderPlaced, send_receipt)
    async with bus:
        await bus.publish(OrderPlaced("o-1", 9.5))
        await bus.drain()
    ```

    Keywords (the pure-Python ``InMemoryEventBus``'s names work too): ``workers`` / ``worker_count``
    (how many events may be in handlers at once; same-key events still run one at a time, in order),
    ``max_queue_size`` (0 = unbounded; ``await publish()`` waits when full), ``transport`` (a URL or
    options: ``oxbus.Memory()``, the default, ``oxbus.Sqlite(path)`` for the durable bus,
    ``oxbus.RedisStreams(url, group=...)``, ``oxbus.RabbitMQ(url, group=...)``; ``store=`` is
    short for ``transport=oxbus.Sqlite(store)``, and beside a URL ``group=``, ``stream=``,
    ``exchange=``, ``partitions=``... are the settings of the URL's options class),
    ``event_storage`` (an object with async
    ``store_event(event)`` and ``mark_event_processed(event_id, result)``), ``retry`` (a
    [`RetryPolicy`][oxbus.RetryPolicy] for every subscription), ``sync_handlers`` (``"loop"`` or
    ``"thread"``), ``batch_size`` / ``batch_timeout_seconds`` (accepted; dispatch is never delayed).

    Also: ``handler_timeout`` (seconds per handler call for every subscription; None, the
    default, is no limit), ``thread_pool_size`` (the threads of ``sync_handlers="thread"``),
    ``ordered`` (per-key order; default: when ``workers > 1``, with one worker every event is
    handled in publish order anyway), ``clock`` (retry delays and breaker cool-downs read it:
    ``oxbus.testing.ManualClock()`` in tests), ``max_event_bytes`` (refuse an event whose JSON
    encoding is larger, with ``InvalidEvent``; off by default) and ``name`` (the ``bus`` label
    of its metrics, ``"oxbus"`` by default).
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        worker_count: int | None = None,
        max_queue_size: int = 10_000,
        event_storage: Any = None,
        retry: RetryPolicy | None = None,
        handler_timeout: float | None = None,
        sync_handlers: str = "loop",
        thread_pool_size: int | None = None,
        batch_size: int | None = None,
        batch_timeout_seconds: float | None = None,
        ordered: bool | None = None,
        store: SqliteEventStore | str | os.PathLike[str] | None = None,
        transport: TransportSpec | None = None,
        group: str | None = None,
        consumer: str | None = None,
        stream: str | None = None,
        claim_idle: float | None = None,
        partitions: int | None = None,
        maxlen: int | None = None,
        max_deliveries: int | None = None,
        publish_timeout: float | None = None,
        prefetch: int | None = None,
        consume: bool | None = None,
        exchange: str | None = None,
        queue: str | None = None,
        connect_timeout: float | None = None,
        lease_ttl: float | None = None,
        clock: Any = None,
        max_event_bytes: int | None = None,
        name: str = "oxbus",
    ) -> None:
        settings = BusSettings.check(
            workers=workers, worker_count=worker_count, sync_handlers=sync_handlers,
            thread_pool_size=thread_pool_size, batch_size=batch_size,
            batch_timeout_seconds=batch_timeout_seconds, retry=retry,
            handler_timeout=handler_timeout, max_event_bytes=max_event_bytes, clock=clock,
        )
        given = locals()
        options = resolve(
            transport, store, event_storage,
            {k: given[k] for k in URL_KEYWORDS if given[k] is not None},
        )
        self._timeout = settings.handler_timeout
        self._max_bytes = max_event_bytes
        self._executor: ElasticPool | None = None
        if settings.thread_pool_size is not None:
            self._executor = ElasticPool(settings.thread_pool_size, f"{name}-sync")
        self._core = BusCore(settings.workers, max_queue_size, ordered, sync_handlers == "thread", self._executor, retry)
        self._retry = retry or RetryPolicy()
        self._background = Background()
        # durable bus: subscription id -> (name, from_beginning)
        self._durable: dict[int, tuple[str, bool]] = {}
        self.dead_letters = DeadLetters(self._core, self._background.spawn, self._durable)
        self._backend = backend_for(self._core, options, event_storage, self.dead_letters, self._durable)
        self._store = store_of(self._backend)
        self._failures = FailureBook(self.dead_letters, self._store, event_storage)
        # Successful calls need the Python hook only for event_storage; a durable bus records
        # them done from Rust (set_progress), so Python runs per failure, not per event.
        self._core.set_after_call(self._failures.after_call, self._failures.wants_successes)
        self._core.set_timeout_wrapper(functools.partial(call_with_timeout, self._executor))
        self._plain = max_event_bytes is None and self._backend.plain
        if type(self).publish is EventBus.publish:
            # ``bus.publish`` goes straight to where events go (a subclass that overrides
            # ``publish`` keeps its own). In memory: the engine's own method, whose awaitable
            # (``oxbus._oxbus.Publish``) behaves as this class's coroutine without its Python
            # frame and coroutine object (a tenth of the cost of an event). Other backends:
            # their coroutine, without this one around it.
            if self._plain:
                self.publish = publisher(self._core)  # type: ignore[method-assign]
            elif max_event_bytes is None:
                self.publish = self._backend.publish  # type: ignore[method-assign]
        if clock is not None:
            self._core.set_clock(clock.sleep, clock.time)
        self.clock = clock
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._heartbeats: _heartbeat.HeartbeatMonitor | None = None
        # Every subscription made, by id (kept after unsubscribe: dead letters name them).
        self._subscriptions: dict[int, Subscription] = {}
        self._threadsafe = ThreadsafePublisher()
        self._sagas: SagaManager | None = None

    @property
    def transport(self) -> Transport:
        """The transport options this bus was made with (``oxbus.Memory()`` by default)."""
        return self._backend.options

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Starts the workers on the running loop. Idempotent."""
        if self._core.running:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._core.start(loop)
        self._tasks = [start_worker(loop, self._core, i, f"{self._name}-worker-{i}")
                       for i in range(self._core.workers)]
        for task in self._tasks:
            task.add_done_callback(self._on_worker_done)
        try:
            await self._backend.start()  # the durable bus's replay; connecting to a broker
            if self._sagas is not None:
                await self._sagas.start()  # instances loaded, deadlines armed
        except BaseException:
            await self.stop(drain=False)  # a failed start leaves the bus stopped
            raise
        logger.info(
            "bus %r started: %d worker(s), transport %r", self._name, self._core.workers,
            self.transport,
        )

    def _spawn(self, aw: Awaitable[Any]) -> None:
        """Runs store bookkeeping in the background, keeping a reference until it ends."""
        self._background.spawn(aw)

    async def stop(self, timeout: float | None = None, *, drain: bool = True) -> int:
        """Stops the bus. Idempotent; a no-op before ``start``.

        With ``drain`` (the default) it first waits, up to ``timeout`` seconds, for every
        accepted event to be handled. Events still queued after that (or at once with
        ``drain=False``) are discarded; handler calls already running may finish within what
        is left of ``timeout`` (with ``drain=False`` and no timeout they are cancelled at
        once), then are cancelled. Both
        are logged and their number returned (on a durable bus they stay in the log and are
        delivered after the next start).
        """
        if not self._core.running:
            return 0
        _waiting.refuse_inside_handler("stop", self._loop is not None)
        if self._heartbeats is not None:
            await self._heartbeats.stop()
        if self._sagas is not None:
            await self._sagas.stop()  # no deadline fires from here on
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Intake closes first: a publish from outside the bus is refused (BusClosed) from
        # here on, so nothing is accepted and then dropped; handlers keep running and what
        # they publish is taken and drained.
        self._core.close_intake()
        self._threadsafe.fail_all()
        self._backend.pause()  # a broker: take no new entries; drain what was received
        if drain:
            try:
                await self.drain(timeout)
            except TimeoutError:
                logger.warning("stop: drain timed out after %ss; discarding the rest", timeout)
        interrupted = self._core.statistics()["events_interrupted"]
        discarded: int = self._core.close(True)
        # Handlers already running may finish within what is left of the timeout (with
        # drain=False and no timeout they are cancelled at once).
        if drain or deadline is not None:
            await _waiting.settle(
                self._core, None if deadline is None else max(0.0, deadline - loop.time())
            )
        # The workers get what is left of the timeout (at least a moment; 5 s without one),
        # then the ones still running are abandoned, with an error logged.
        left = 5.0 if deadline is None else max(0.05, deadline - loop.time())
        discarded += await cancel_workers(self._tasks, left, self._on_worker_done)
        cut = self._core.statistics()["events_interrupted"] - interrupted
        if discarded or cut:
            logger.warning(
                "stop: %d queued event(s) discarded, %d handler call(s) interrupted",
                discarded, cut,
            )
        discarded += cut
        self._tasks = []
        self._failures.clear()
        await self._background.wait()
        await self._backend.close()  # closes a store the bus opened; disconnects a broker
        logger.info("bus %r stopped: %d event(s) discarded or interrupted", self._name, discarded)
        return discarded

    async def __aenter__(self) -> EventBus:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def is_running(self) -> bool:
        """Whether the bus accepts events."""
        return bool(self._core.running)

    # --------------------------------------------------------------- subscribing

    @overload
    def subscribe(
        self, event_type: type[E], handler: Callable[[E], object], is_async: bool = True,
        priority: int = 1, retry_count: int | None = None, *, retry: RetryPolicy | None = None,
        name: str | None = None, from_beginning: bool = False, timeout: float | None = None,
        circuit_breaker: CircuitBreaker | None = None, on_dead_letter: str = "skip",
    ) -> str: ...
    @overload
    def subscribe(
        self, event_type: Named, handler: Callable[[Any], object], is_async: bool = True,
        priority: int = 1, retry_count: int | None = None, *, retry: RetryPolicy | None = None,
        name: str | None = None, from_beginning: bool = False, timeout: float | None = None,
        circuit_breaker: CircuitBreaker | None = None, on_dead_letter: str = "skip",
    ) -> str: ...
    def subscribe(
        self,
        event_type: Target,
        handler: Handler,
        is_async: bool = True,
        priority: int = 1,
        retry_count: int | None = None,
        *,
        retry: RetryPolicy | None = None,
        name: str | None = None,
        from_beginning: bool = False,
        timeout: float | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        on_dead_letter: str = "skip",
    ) -> str:
        """Subscribes ``handler`` and returns a subscription id.

        ``is_async``, ``priority`` and ``retry_count`` may be given by position, in that
        order, as the pure-Python bus's callers do: ``subscribe(OrderPlaced, h, True, 1, 3)``.

        ``event_type`` is a class (its subclasses match too), a type string, a dotted
        pattern (``"order.*"``: ``*`` one word, ``#`` any number), or an Enum member (its
        value). Smaller ``priority`` runs first; ties run in subscription order.
        ``retry_count=N`` retries a failing call N times (``max_attempts=N+1``) with the
        bus's backoff; ``retry`` gives a whole policy. ``is_async`` is accepted for
        compatibility: the handler's kind is detected. ``timeout`` (default: the bus's
        ``handler_timeout``) cancels an async or thread-pool call that runs longer and counts
        it as failed (``TimeoutError``). ``circuit_breaker=CircuitBreaker(failures,
        cool_down)`` pauses the subscription after that many failures in a row.
        ``on_dead_letter="park"`` (with a key): after a dead letter of key K, later events of
        K wait behind it in the dead-letter queue, in order, until it is retried or discarded;
        ``"skip"`` (the default) lets them proceed.
        """
        retry, sub_name = check_options(
            handler, priority, name, retry_count, retry, self._retry, on_dead_letter,
            circuit_breaker,
        )
        if self._store is not None and self._core.has_name(sub_name):
            raise ConfigurationError(
                f"a subscription named {sub_name!r} exists already; on a durable bus each "
                "subscription's progress is kept under its name, so give name="
            )
        t = _timeout("timeout", timeout) if timeout is not None else self._timeout
        policy = retry or self._retry
        threaded = not _is_async(handler)
        breaker = (
            None
            if circuit_breaker is None
            else (circuit_breaker.failures, circuit_breaker.cool_down)
        )
        sid = self._core.subscribe(
            event_type, handler, priority, sub_name, threaded, policy, policy.retry_on, t,
            breaker, on_dead_letter == "park",
        )
        try:
            self._backend.subscribed(event_type)  # a broker routes its events to the group
        except BaseException:
            self._core.unsubscribe(sid)
            raise
        self._subscriptions[sid] = Subscription(
            subscription_id=f"sub-{sid}", event_type=event_type, handler=handler,
            priority=priority, is_async=not threaded, retry_count=policy.max_attempts - 1,
            name=sub_name,
        )
        if self._store is not None:
            self._durable[sid] = (sub_name, from_beginning)
            if self._core.running:
                self._spawn(self._store._core.register_subscription(sub_name, from_beginning))
        return f"sub-{sid}"

    @overload
    def on(
        self, event_type: type[E], **options: Any
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]: ...
    @overload
    def on(self, event_type: Named, **options: Any) -> Callable[[H], H]: ...
    def on(self, event_type: Target, **options: Any) -> Callable[[H], H]:
        """Decorator form of [`subscribe`][oxbus.EventBus.subscribe] (for a class, mypy checks
        the handler's argument type as `subscribe` does):

        ```python
        @bus.on(OrderPlaced, priority=5)
        async def send_receipt(event: OrderPlaced) -> None: ...
        ```
        """

        def register(handler: H) -> H:
            self.subscribe(event_type, handler, **options)
            return handler

        return register

    async def ready(self) -> None:
        """Waits until every subscription made so far receives events published by other
        processes. Only a subscription made while the bus runs on RabbitMQ waits: its pattern
        is being bound to the group's queue (what this bus publishes after ``subscribe()``
        returns is routed by it already). Returns at once on the other transports.

        Raises ``TransportError`` when RabbitMQ did not bind within ``publish_timeout`` (the
        binding is made again on the next connection).
        """
        await self._backend.ready()

    def unsubscribe(self, subscription: str | Target, handler: Handler | None = None) -> bool:
        """``unsubscribe(subscription_id)`` or ``unsubscribe(event_type, handler)``.

        Returns whether anything was removed.
        """
        if handler is None:
            # An id it does not know (or any other value) removes nothing: False, as in the
            # replaced bus, never an error.
            if not (isinstance(subscription, str) and subscription.startswith("sub-")):
                return False
            try:
                sid = int(subscription[4:])
            except ValueError:
                return False
            return sid >= 0 and bool(self._core.unsubscribe(sid))
        return bool(self._core.unsubscribe_handler(subscription, handler))

    def register_saga(self, saga: S) -> S:
        """Registers a saga class (see [`oxbus.Saga`][oxbus.Saga]) and returns it: its steps'
        event types are subscribed (as ``Saga.step``); events find their instance by its
        ``key``. A definition that cannot work raises
        [`InvalidSaga`][oxbus.errors.InvalidSaga] naming the problem.
        """
        SagaManager.of(self).register(saga)
        return saga

    @property
    def sagas(self) -> Sagas:
        """The saga instances: ``await bus.sagas.instances(OrderSaga, state="running")``."""
        return Sagas(SagaManager.of(self))

    def subscriptions(self) -> list[dict[str, Any]]:
        """Every subscription: id, name, priority and target, in subscription order."""
        return [
            {"id": f"sub-{i}", "name": n, "priority": p, "event_type": t}
            for i, n, p, t in self._core.subscriptions()
        ]

    # ---------------------------------------------------------------- publishing

    # key and correlation_id are positional-or-keyword on purpose: keyword-only defaults
    # cost a dict lookup per call on this, the hottest path.
    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool:
        """Publishes ``event``; returns True once the bus accepted it.

        Waits only when ``max_queue_size`` events are queued (a durable bus: until the event
        is committed; Redis: until Redis accepted it). ``key`` overrides the ordering key
        (default: ``event.aggregate_id``). Raises ``BusNotStarted`` before ``start()``,
        ``BusClosed`` after ``stop()``.
        """
        if self._plain:  # in memory: the engine's awaitable (see __init__)
            return await publishing(self._core, event, key, correlation_id)
        if self._max_bytes is not None:
            self._check_size(event)
        return await self._backend.publish(event, key, correlation_id)

    def _check_size(self, event: Any) -> None:
        size = len(encode_json(event).encode())
        if size > self._max_bytes:  # type: ignore[operator]
            raise InvalidEvent(
                f"{type(event).__name__} event is {size} bytes encoded, over "
                f"max_event_bytes={self._max_bytes}"
            )

    def publish_nowait(self, event: Any, *, key: Any = None, correlation_id: Any = None) -> None:
        """Publishes without waiting; raises ``QueueFull`` when the queue is full."""
        if self._max_bytes is not None:
            self._check_size(event)
        self._backend.publish_nowait(event, key, correlation_id)

    async def publish_many(self, events: Iterable[Any]) -> int:
        """Publishes every event in order; returns how many were accepted. From a handler,
        each is a child of the event being handled (its correlation id; its id as cause)."""
        if self._max_bytes is not None:
            events = list(events)
            for e in events:
                self._check_size(e)
        return await self._backend.publish_many(events)

    async def publish_batch(self, events: Iterable[Any]) -> None:
        """``publish_many`` with the pure-Python bus's return value (None)."""
        await self.publish_many(events)

    def publish_threadsafe(self, event: Any, **kwargs: Any) -> concurrent.futures.Future[bool]:
        """Publishes from any thread; returns a ``concurrent.futures.Future[bool]``.

        Do not block on the future from the loop's own thread.
        """
        loop = self._loop
        if loop is None or not self._core.running:
            raise BusNotStarted("the bus is not started: publish_threadsafe needs a running bus")
        return self._threadsafe.submit(loop, lambda: self.publish(event, **kwargs))

    def _on_worker_done(self, task: asyncio.Task[Any]) -> None:
        """A worker task ended without ``stop()``: its loop is shutting down. Refuse further
        publishes and fail the thread-side futures still waiting, so no caller waits forever.
        Its exception (a handler's ``SystemExit``/``KeyboardInterrupt``, or a bug: logged) is
        retrieved, not reported again as "Task exception was never retrieved" at exit."""
        if not task.cancelled():
            exc = task.exception()
            if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
                logger.error("%s ended with an error", task.get_name(), exc_info=exc)
        if self._core.running:
            self._core.close_intake()
            self._threadsafe.fail_all()

    # ------------------------------------------------------------------- waiting

    async def drain(self, timeout: float | None = None) -> None:
        """Waits until every accepted event has been handled, retries included.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        _waiting.refuse_inside_handler("drain", self._loop is not None)
        await _waiting.drain(self._core, timeout)

    @overload
    def wait_for(
        self, event_type: type[E], predicate: Callable[[E], bool] | None = None,
        timeout: float | None = None,
    ) -> Awaitable[E]: ...
    @overload
    def wait_for(
        self, event_type: Named, predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Awaitable[Any]: ...
    def wait_for(
        self,
        event_type: Target,
        predicate: Callable[[Any], bool] | None = None,
        timeout: float | None = None,
    ) -> Awaitable[Any]:
        """The first matching event accepted after this call (before its handlers run).

        It listens from the moment it is called, so ``w = bus.wait_for(X)`` followed by
        ``await bus.publish(x)`` and ``await w`` sees ``x``. Raises ``TimeoutError`` after
        ``timeout`` seconds. ``event_type`` is a class, type string, pattern or Enum member.
        """
        fut = asyncio.get_running_loop().create_future()
        wid = self._core.add_waiter(event_type, predicate, fut)
        return _waiting.wait_for_event(self._core, fut, wid, event_type, timeout)

    # ------------------------------------------------------------------- failures

    def get_failed_events(self) -> list[dict[str, Any]]:
        """Dead letters in the pure-Python bus's shape: dicts of event, subscription,
        final_result (the last attempt's ``ProcessingResult``) and failed_at (UTC)."""
        return self.dead_letters._as_failed_events(self._subscriptions)

    def clear_failed_events(self) -> None:
        """Empties the dead-letter queue."""
        self.dead_letters.purge()

    # --------------------------------------------------------------- statistics

    def get_statistics(self) -> dict[str, Any]:
        """Counters: events_published, events_processed, events_failed (handler calls that
        raised), handler_calls, retried, dead_lettered, avg_processing_time_ms,
        handler_latency_ms (p50/p90/p99/max, over every call), queue_size, retry_queue_size,
        failed_events_count, subscription_count, is_running, worker_count, by_event_type
        (published, processed, failed), by_subscription (calls, failed, retried,
        dead_lettered; keyed by subscription name), uptime_seconds, for a broker bus
        partitions (the partitions this member reads, the group's assignment), and the sagas'
        instances: sagas_started, sagas_completed, sagas_compensated (compensations
        published), sagas_failed, sagas_ignored (events no instance took), sagas_duplicates
        (events applied already), sagas_running, and by_saga (the same per saga).

        ```python
        failed = bus.get_statistics()["by_subscription"]["billing"]["failed"]
        ```
        """
        return _reports.statistics(self._core, self.dead_letters, self._backend, self._sagas)

    def get_stats(self) -> dict[str, Any]:
        """The statistics in the shape of the Redis Pub/Sub bus oxbus replaces (its
        ``get_stats()``): published, received, processed, failed."""
        return _reports.legacy_stats(self._core)

    def get_health_status(self) -> dict[str, Any]:
        """``status`` (healthy / degraded / stopped, with ``reasons``), queue_size,
        worker_count, in_flight, lanes, oldest queued age, memory_usage_mb, cpu_percent,
        system memory, error rate, dead letters and the thresholds used (and ``transport``
        for a broker)."""
        return _reports.health(self._core, self._backend, self._executor, self._heartbeats)

    def metrics(self) -> str:
        """The bus's metrics in the Prometheus text format (see ``oxbus.metrics``)."""
        from oxbus.metrics import render  # prometheus_client is imported on first use

        return render(self)

    async def broadcast_heartbeat(self, source: str, interval: float) -> _heartbeat.HeartbeatHandle:
        """Publishes an ``oxbus.Heartbeat`` of ``source`` now and every ``interval`` seconds
        (on the bus's clock) until the bus stops or ``handle.cancel()``; health lists the last
        heartbeat seen per source (see ``oxbus.heartbeat``)."""
        return await _heartbeat.watch(self, listen=False).broadcast(source, interval)

    def __repr__(self) -> str:
        return _reports.summary(type(self).__name__, self._core)

