"""``EventBus``: the public bus. A thin Python shell around the Rust engine (``BusCore``).

The engine owns the queue, the per-key lanes, routing, statistics and health; workers are
native coroutines run as asyncio tasks. This module adds what is naturally Python: the
asyncio glue (start/stop/drain/wait_for), the ``event_storage`` protocol of the bus being
replaced, failure logging, and the dead-letter list.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import os
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterable, Iterator, TypeVar, Union

from oxbus._oxbus import BusCore, Envelope, RedisCore, RetryPolicy, current_envelope, encode_json
from oxbus import heartbeat as _heartbeat
from oxbus import log as _log  # noqa: F401 - puts the correlation fields on the "oxbus" logger
from oxbus._pool import ElasticPool
from oxbus.store import SqliteEventStore
from oxbus.subscription import Subscription
from oxbus.errors import (
    BusClosed,
    BusNotStarted,
    ConfigurationError,
    InvalidEvent,
    InvalidSubscription,
    OxbusError,
    ReentrantCall,
)

__all__ = [
    "CircuitBreaker",
    "DeadLetter",
    "DeadLetters",
    "EventBus",
    "EventBusFactory",
    "EventBusManager",
    "InMemoryEventBus",
    "ProcessingResult",
]

logger = logging.getLogger("oxbus")

Handler = Callable[[Any], Union[Awaitable[Any], Any]]
H = TypeVar("H", bound=Handler)
Target = Any  # a class, a type string or pattern, or an Enum member


@dataclass
class ProcessingResult:
    """The outcome of one handler call, as handed to ``event_storage.mark_event_processed``.

    The fields of the replaced bus's ``EventProcessingResult``, in its order, plus the
    subscription's name.
    """

    event_id: str
    success: bool
    error_message: str | None = None
    processing_time_ms: float = 0.0
    retry_attempt: int = 0
    subscription: str = ""


@dataclass
class DeadLetter:
    """An (event, subscription) pair whose last attempt failed."""

    id: str
    event: Any
    subscription: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    error_type: str
    error_message: str
    traceback: str
    final_result: ProcessingResult = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    subscription_id: str = field(repr=False, compare=False, default="")
    position: int | None = field(repr=False, compare=False, default=None)
    #: the key's lane hash when the subscription parks its keys behind dead letters
    key_hash: int | None = field(repr=False, compare=False, default=None)
    #: the id of the dead letter this event is parked behind (it was never handled)
    parked_behind: str | None = field(repr=False, compare=False, default=None)
    #: the ordering key it was published with (explicit or its aggregate_id)
    key: Any = field(repr=False, compare=False, default=None)


class DeadLetters:
    """The dead-letter queue of one bus: ``list()``, ``len()``, ``await retry()``, ``purge()``."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._entries: dict[str, DeadLetter] = {}
        self._seq = 0

    def _add(self, entry: DeadLetter) -> None:
        self._entries[entry.id] = entry
        self._bus._core.set_dead_letters(len(self._entries))

    def _forget(self, entries: list[DeadLetter]) -> None:
        store = self._bus._store
        for e in entries:
            self._entries.pop(e.id, None)
        self._bus._core.set_dead_letters(len(self._entries))
        rows = [int(e.id[3:]) for e in entries if e.id.startswith("db-")]
        if store is not None and rows:
            self._bus._spawn(store._core.remove_dead_letters(rows))

    def _next_id(self) -> str:
        self._seq += 1
        return f"dl-{self._seq}"

    def list(self) -> list[DeadLetter]:
        """Every dead letter, oldest first."""
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(self.list())

    def _get(self, entry_or_id: DeadLetter | str) -> DeadLetter:
        key = entry_or_id.id if isinstance(entry_or_id, DeadLetter) else entry_or_id
        if key not in self._entries:
            raise KeyError(f"no dead letter with id {key!r}")
        return self._entries[key]

    def _parked_behind(self, head: DeadLetter) -> list[DeadLetter]:
        return [e for e in self._entries.values() if e.parked_behind == head.id]

    def _release(self, head: DeadLetter) -> list[DeadLetter]:
        """Unparks the head's key; returns the entries parked behind it, in order."""
        sub = self._bus._sub_id(head)
        if head.key_hash is not None and sub is not None:
            self._bus._core.unpark(sub, head.key_hash)
        return self._parked_behind(head)

    def _redeliver(self, entries: list[DeadLetter]) -> None:
        done: list[DeadLetter] = []
        try:
            for entry in entries:
                sub = self._bus._sub_id(entry)
                if sub is None or not self._bus._core.redeliver(
                    entry.event, sub, entry.position, None, None, entry.key
                ):
                    raise InvalidSubscription(
                        f"dead letter {entry.id!r}: subscription {entry.subscription!r} "
                        "no longer exists; purge it or subscribe again"
                    )
                done.append(entry)
        finally:
            self._forget(done)

    async def retry(self, entry_or_id: DeadLetter | str | None = None) -> int:
        """Re-dispatches dead letters to their subscription only; returns how many.

        ``None`` retries all. A retried entry leaves the queue (it comes back if it fails
        again). Retrying the dead letter a key is parked behind also re-dispatches, in order,
        the events parked behind it.
        """
        chosen = self.list() if entry_or_id is None else [self._get(entry_or_id)]
        order: list[DeadLetter] = []
        for entry in chosen:
            if entry in order:
                continue
            order.append(entry)
            if entry.parked_behind is None:
                order.extend(e for e in self._release(entry) if e not in order)
        self._redeliver(order)
        return len(order)

    def discard(self, entry_or_id: DeadLetter | str) -> int:
        """Drops one dead letter. Events parked behind it were never handled: they are
        dispatched now, in order. Returns how many entries left the queue."""
        entry = self._get(entry_or_id)
        behind = self._release(entry) if entry.parked_behind is None else []
        self._forget([entry])
        self._redeliver(behind)
        return 1 + len(behind)

    def purge(self) -> int:
        """Drops every dead letter (from the store too, on a durable bus), parked events
        included; returns how many."""
        entries = self.list()
        for e in entries:
            if e.parked_behind is None:
                self._release(e)
        self._forget(entries)
        return len(entries)


@dataclass(frozen=True)
class CircuitBreaker:
    """After ``failures`` failed calls in a row a subscription pauses for ``cool_down``
    seconds (its events wait, nothing is dropped), then tries again once: a success closes
    it, a failure opens it for another ``cool_down``."""

    failures: int = 5
    cool_down: float = 30.0

    def __post_init__(self) -> None:
        _positive_int("failures", self.failures)
        if not isinstance(self.cool_down, (int, float)) or self.cool_down < 0:
            raise ConfigurationError(f"cool_down must be a number >= 0, got {self.cool_down!r}")


def _event_from_payload(payload: dict[str, Any]) -> Any:
    """An event read from a transport: the user's class through the registry, else the data."""
    from oxbus.registry import lookup, rebuild

    data = payload.get("data", {})
    cls = lookup(payload.get("event_type"))
    if cls is None:
        return data
    obj = rebuild(cls, data)
    d = getattr(obj, "__dict__", None)
    if d is not None and getattr(cls, "__oxbus_domain_event__", False):
        d["event_id"] = payload.get("event_id")
        if payload.get("occurred_at"):
            d["occurred_at"] = datetime.fromisoformat(payload["occurred_at"])
        for k, v in (payload.get("metadata") or {}).items():
            if v is not None:
                d[k] = v
    return obj


def _signed(h: int | None) -> int | None:
    """A 64-bit lane hash as SQLite's signed integer."""
    return None if h is None else (h - 2**64 if h >= 2**63 else h)


def _timeout(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def _qualname(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if name is None:
        name = type(obj).__qualname__
    module = getattr(obj, "__module__", None)
    return f"{module}.{name}" if module and module not in ("builtins", "__main__") else name


def _is_async(handler: Any) -> bool:
    target = handler
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
    return value


class EventBus:
    """An asyncio event bus with a Rust engine.

    ::

        bus = EventBus(workers=4)
        bus.subscribe(OrderPlaced, send_receipt)
        async with bus:
            await bus.publish(OrderPlaced("o-1", 9.5))
            await bus.drain()

    Keywords (the replaced bus's names work too): ``workers`` / ``worker_count`` (how many
    events may be in handlers at once; same-key events still run one at a time, in order),
    ``max_queue_size`` (0 = unbounded; ``await publish()`` waits when full), ``event_storage``
    (an object with async ``store_event(event)`` and ``mark_event_processed(event_id,
    result)``), ``retry`` (a :class:`RetryPolicy` for every subscription), ``sync_handlers``
    (``"loop"`` or ``"thread"``), ``batch_size`` / ``batch_timeout_seconds`` (accepted; dispatch
    is never delayed).
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
        transport: str | None = None,
        group: str = "default",
        consumer: str | None = None,
        stream: str = "oxbus:events",
        claim_idle: float = 30.0,
        partitions: int = 1,
        maxlen: int = 1_000_000,
        max_deliveries: int = 5,
        publish_timeout: float = 5.0,
        prefetch: int = 1000,
        consume: bool | None = None,
        clock: Any = None,
        max_event_bytes: int | None = None,
        name: str = "oxbus",
    ) -> None:
        if workers is not None and worker_count is not None and workers != worker_count:
            raise ConfigurationError(
                f"workers={workers!r} and worker_count={worker_count!r} disagree; give one"
            )
        n = workers if workers is not None else worker_count if worker_count is not None else 1
        if sync_handlers not in ("loop", "thread"):
            raise ConfigurationError(
                f"sync_handlers must be 'loop' or 'thread', got {sync_handlers!r}"
            )
        if batch_size is not None:
            _positive_int("batch_size", batch_size)
        if batch_timeout_seconds is not None and not (
            isinstance(batch_timeout_seconds, (int, float)) and batch_timeout_seconds >= 0
        ):
            raise ConfigurationError(
                f"batch_timeout_seconds must be a number >= 0, got {batch_timeout_seconds!r}"
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        self._timeout = _timeout("handler_timeout", handler_timeout)
        if max_event_bytes is not None:
            _positive_int("max_event_bytes", max_event_bytes)
        self._max_bytes = max_event_bytes
        self._executor: ElasticPool | None = None
        if sync_handlers == "thread":
            size = _positive_int("thread_pool_size", thread_pool_size or 8)
            self._executor = ElasticPool(size, f"{name}-sync")
        self._store: SqliteEventStore | None
        self._owns_store = False
        if store is None or isinstance(store, SqliteEventStore):
            self._store = store
        elif isinstance(store, (str, os.PathLike)):
            self._store = SqliteEventStore(os.fspath(store))
            self._owns_store = True
        else:
            raise ConfigurationError(
                f"store must be a SqliteEventStore or a file path, got {store!r}"
            )
        if self._store is not None and event_storage is not None:
            raise ConfigurationError("give store= or event_storage=, not both")
        self._redis: RedisCore | None = None
        self._redis_args: tuple[Any, ...] | None = None
        if transport is not None:
            if self._store is not None or event_storage is not None:
                raise ConfigurationError("a Redis transport cannot be combined with store= or event_storage=")
            if not isinstance(transport, str) or not transport.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigurationError(
                    f"transport must be a redis:// (or rediss://, unix://) URL, got {transport!r}"
                )
            _positive_int("partitions", partitions)
            if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 0:
                raise ConfigurationError(f"maxlen must be an int >= 0 (0 = unbounded), got {maxlen!r}")
            for kw, v in (("claim_idle", claim_idle), ("publish_timeout", publish_timeout)):
                _timeout(kw, v)
            streams = [stream] if partitions == 1 else [f"{stream}:{i}" for i in range(partitions)]
            who = consumer or f"{socket.gethostname()}-{os.getpid()}"
            self._redis_args = (
                transport, streams, group, who, float(claim_idle), int(maxlen), 256,
                _positive_int("prefetch", prefetch), _positive_int("max_deliveries", max_deliveries),
                f"{stream}:dead", float(publish_timeout), consume,
            )
        self._core = BusCore(n, max_queue_size, ordered, sync_handlers == "thread", self._executor, retry)
        self._retry = retry or RetryPolicy()
        self._storage = event_storage
        self._mark = getattr(event_storage, "mark_event_processed", None)
        # Successful calls need the Python hook only for event_storage; a durable bus records
        # them done from Rust (set_progress), so Python runs per failure, not per event.
        self._core.set_after_call(self._after_call, self._mark is not None)
        if self._store is not None:
            self._core.set_progress(self._store._core)
        self._core.set_timeout_wrapper(self._timed)
        self._plain = (
            max_event_bytes is None and event_storage is None and self._store is None
            and self._redis_args is None
        )
        if clock is not None:
            if not (callable(getattr(clock, "sleep", None)) and callable(getattr(clock, "time", None))):
                raise ConfigurationError(
                    f"clock must have sleep(seconds) and time() methods, got {clock!r}"
                )
            self._core.set_clock(clock.sleep, clock.time)
        self.clock = clock
        # durable bus: subscription id -> (name, from_beginning)
        self._durable: dict[int, tuple[str, bool]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.dead_letters = DeadLetters(self)
        self._first_failures: dict[tuple[int, str], datetime] = {}
        self._heartbeats: _heartbeat.HeartbeatMonitor | None = None
        # Every subscription made, by id (kept after unsubscribe: dead letters name them).
        self._subscriptions: dict[int, Subscription] = {}
        # publish_threadsafe futures whose event has not reached the loop yet.
        self._threadsafe: set[concurrent.futures.Future[bool]] = set()
        self._threadsafe_guard = threading.Lock()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Starts the workers on the running loop. Idempotent."""
        if self._core.running:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._core.start(loop)
        self._tasks = [
            loop.create_task(self._core.worker(i), name=f"{self._name}-worker-{i}")  # type: ignore[arg-type]
            for i in range(self._core.workers)
        ]
        for task in self._tasks:
            task.add_done_callback(self._on_worker_done)
        if self._store is not None:
            try:
                await self._recover()
            except BaseException:
                await self.stop(drain=False)  # a failed start leaves the bus stopped
                raise
        if self._redis_args is not None:
            try:
                # Connecting may take a while: on the engine's runtime, never on the loop thread.
                args = self._redis_args
                if args[-1] is None:  # consume=None: a bus with subscriptions joins its group
                    args = (*args[:-1], bool(self._core.subscriptions()))
                names = (
                    "url", "streams", "group", "consumer", "claim_idle", "maxlen", "batch",
                    "prefetch", "max_deliveries", "dead_stream", "publish_timeout", "consume",
                )
                self._redis = await RedisCore.connect(**dict(zip(names, args)))
            except BaseException:
                await self.stop(drain=False)
                raise
            self._redis.set_target(loop, self._on_entries)

    def _on_entries(self) -> None:
        # Entries that arrive while the bus stops stay unacknowledged: Redis redelivers them.
        if self._redis is not None and self._core.running:
            _, refused = self._redis.dispatch(self._core, _event_from_payload)
            for reason in refused:
                logger.error("Redis %s: moved to the dead-letter stream", reason)

    async def _recover(self) -> None:
        """Durable bus: queue, for each subscription, every committed event it has not
        finished (in log order), and load the stored dead letters."""
        store = self._store
        assert store is not None
        targets = {sid: target for sid, _, _, target in self._core.subscriptions()}
        for sid, (name, from_beginning) in list(self._durable.items()):
            start_after = await store._core.register_subscription(name, from_beginning)
            # A row that cannot be decoded becomes a dead letter of this subscription.
            for stored, event in await store._undelivered(name, start_after, targets.get(sid)):
                self._core.redeliver(
                    event, sid, stored.position, stored.correlation_id, stored.causation_id
                )
        self.dead_letters._entries.clear()
        by_position: dict[tuple[int, str], DeadLetter] = {}
        for row in await store._core.dead_letters():
            did, pos, sub, attempts, first, last, etype, emsg, tb, key_hash, behind = row
            row = await store._core.at(pos)
            event = store._event_or_none(row)
            self.dead_letters._add(
                DeadLetter(
                    id=f"db-{did}", event=event, subscription=sub, attempts=attempts,
                    first_failed_at=datetime.fromisoformat(first),
                    last_failed_at=datetime.fromisoformat(last), error_type=etype,
                    error_message=emsg, traceback=tb, position=pos,
                    final_result=ProcessingResult(
                        event_id=getattr(event, "event_id", None) if not isinstance(event, dict)
                        else event.get("event_id"),
                        success=False,
                        error_message=f"{etype.rsplit('.', 1)[-1]}: {emsg}",
                        retry_attempt=attempts - 1,
                        subscription=sub,
                    ),
                    key_hash=None if key_hash is None else key_hash % 2**64,
                    subscription_id=next(
                        (f"sub-{sid}" for sid, (name, _) in self._durable.items() if name == sub), ""
                    ),
                )
            )
            entry = self.dead_letters._entries[f"db-{did}"]
            head = by_position.get((behind, sub)) if behind is not None else None
            if head is not None:
                entry.parked_behind = head.id
            elif entry.key_hash is not None and entry.subscription_id:
                # The head of a parked key: park it again, as before the restart.
                self._core.park(int(entry.subscription_id[4:]), entry.key_hash)
            by_position[(pos, sub)] = entry

    def _spawn(self, aw: Awaitable[Any]) -> None:
        """Runs store bookkeeping in the background, keeping a reference until it ends."""
        async def run() -> None:
            try:
                await aw
            except Exception:
                logger.exception("event store bookkeeping failed")

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _sub_id(self, entry: DeadLetter) -> int | None:
        if entry.subscription_id:
            return int(entry.subscription_id.removeprefix("sub-"))
        for sid, (name, _) in self._durable.items():
            if name == entry.subscription:
                return sid
        return None

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
        self._refuse_inside_handler("stop")
        if self._heartbeats is not None:
            await self._heartbeats.stop()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        # Intake closes first: a publish from outside the bus is refused (BusClosed) from
        # here on, so nothing is accepted and then dropped; handlers keep running and what
        # they publish is taken and drained.
        self._core.close_intake()
        self._fail_threadsafe()
        if self._redis is not None:
            self._redis.pause()  # take no new entries; drain what was received
        if drain:
            try:
                await self.drain(timeout)
            except TimeoutError:
                logger.warning("stop: drain timed out after %ss; discarding the rest", timeout)
        interrupted = self._core.statistics()["events_interrupted"]
        discarded = self._core.close(True)
        # Handlers already running may finish within what is left of the timeout (with
        # drain=False and no timeout they are cancelled at once).
        running = self._core.drain_waiter() if (drain or deadline is not None) else None
        if running is not None:
            left = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await asyncio.wait_for(running, left)
            except asyncio.TimeoutError:
                pass
        for t in self._tasks:
            t.cancel()
        # A handler that swallows CancelledError would keep its worker (and stop) waiting
        # for ever: the workers get what is left of the timeout (at least a moment; 5 s
        # without one), then the ones still running are abandoned, with an error logged.
        left = 5.0 if deadline is None else max(0.05, deadline - loop.time())
        _, stuck = await asyncio.wait(self._tasks, timeout=left) if self._tasks else ((), ())
        discarded += len(stuck)
        for t in stuck:
            t.remove_done_callback(self._on_worker_done)
            logger.error(
                "stop: %s did not end after it was cancelled (a handler swallowed "
                "CancelledError?); abandoned", t.get_name(),
            )
        cut = self._core.statistics()["events_interrupted"] - interrupted
        if discarded or cut:
            logger.warning(
                "stop: %d queued event(s) discarded, %d handler call(s) interrupted",
                discarded, cut,
            )
        discarded += cut
        self._tasks = []
        self._first_failures.clear()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._owns_store and self._store is not None:
            await self._store._core.close_async()
        if self._redis is not None:
            redis, self._redis = self._redis, None
            await redis.stop()
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
        order, as the replaced bus's callers do: ``subscribe(OrderPlaced, h, True, 1, 3)``.

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
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidSubscription(f"priority must be an int, got {priority!r}")
        if not -(2**63) <= priority < 2**63:
            raise InvalidSubscription(f"priority must fit in 64 bits, got {priority!r}")
        if name is not None and not isinstance(name, str):
            raise InvalidSubscription(
                f"name must be a str, got {name!r} (type {type(name).__name__})"
            )
        if retry_count is not None and retry is not None:
            raise ConfigurationError("give retry_count or retry, not both")
        if retry_count is not None:
            if isinstance(retry_count, bool) or not isinstance(retry_count, int) or retry_count < 0:
                raise ConfigurationError(f"retry_count must be an int >= 0, got {retry_count!r}")
            r = self._retry
            retry = RetryPolicy(
                retry_count + 1, r.base_delay, r.max_delay, r.multiplier, r.jitter, r.retry_on
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        if not callable(handler):
            raise InvalidSubscription(
                f"handler must be callable, got {handler!r} (type {type(handler).__name__})"
            )
        if inspect.isasyncgenfunction(handler) or inspect.isgeneratorfunction(handler):
            raise InvalidSubscription(
                f"handler {_qualname(handler)} is a generator function: calling it would not "
                "run its body; use `def` or `async def` without `yield`"
            )
        sub_name = name if name is not None else _qualname(handler)
        if self._store is not None and self._core.has_name(sub_name):
            raise ConfigurationError(
                f"a subscription named {sub_name!r} exists already; on a durable bus each "
                "subscription's progress is kept under its name, so give name="
            )
        if on_dead_letter not in ("skip", "park"):
            raise ConfigurationError(
                f"on_dead_letter must be 'skip' or 'park', got {on_dead_letter!r}"
            )
        if circuit_breaker is not None and not isinstance(circuit_breaker, CircuitBreaker):
            raise ConfigurationError(
                f"circuit_breaker must be a CircuitBreaker, got {circuit_breaker!r}"
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

    def on(self, event_type: Target, **options: Any) -> Callable[[H], H]:
        """Decorator form of :meth:`subscribe`::

        @bus.on(OrderPlaced, priority=5)
        async def send_receipt(event): ...
        """

        def register(handler: H) -> H:
            self.subscribe(event_type, handler, **options)
            return handler

        return register

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

        Waits only when ``max_queue_size`` events are queued. ``key`` overrides the
        ordering key (default: ``event.aggregate_id``). Raises ``BusNotStarted`` before
        ``start()``, ``BusClosed`` after ``stop()``.
        """
        if self._plain:  # the in-memory fast path: one Rust call, no future while there is room
            waiter = self._core.publish(event, key, correlation_id)
            if waiter is not None:
                await self._admission(waiter)
            return True
        if self._max_bytes is not None:
            self._check_size(event)
        if self._storage is not None:
            self._core.ensure_running()  # never store an event the bus then refuses
            await self._storage.store_event(event)
        elif self._store is not None:
            return await self._publish_durable(event, key, correlation_id)
        elif self._redis_args is not None:
            self._core.ensure_running()
            if self._redis is None:
                raise BusNotStarted("the bus is still connecting to Redis: await bus.start() first")
            await self._redis.publish(event, key, correlation_id)
            return True
        waiter = self._core.publish(event, key, correlation_id)
        if waiter is not None:
            await self._admission(waiter)
        return True

    async def _publish_durable(self, event: Any, key: Any, correlation_id: Any) -> bool:
        self._core.ensure_running()  # never commit an event the bus then refuses
        store = self._store
        assert store is not None
        (position,) = await store._core.log(event, key, correlation_id)
        waiter = self._core.publish(event, key, correlation_id, position)
        if waiter is not None:
            await self._admission(waiter)
        return True

    async def _admission(self, waiter: asyncio.Future[Any]) -> None:
        """Waits for room in a full queue. The event enters the queue when this publisher
        resumes, not when room is found: a publisher cancelled in between has not published
        (its room goes to the next one), as ``CancelledError`` tells it."""
        try:
            await waiter
        except BaseException:
            self._core.withdraw(waiter)
            raise
        self._core.enter(waiter)

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
        if self._storage is not None or self._store is not None or self._redis_args is not None:
            raise OxbusError("publish_nowait cannot wait for the store or Redis; use publish")
        self._core.publish_nowait(event, key, correlation_id)

    async def publish_many(self, events: Iterable[Any]) -> int:
        """Publishes every event in order; returns how many were accepted."""
        if self._max_bytes is not None:
            events = list(events)
            for e in events:
                self._check_size(e)
        if self._storage is not None:
            n = 0
            for e in events:
                await self.publish(e)
                n += 1
            return n
        if self._redis is not None:
            self._core.ensure_running()
            items = list(events)
            if items:
                await self._redis.publish_many(items)  # one pipelined request, one future
            return len(items)
        if self._store is not None:
            # One atomic group in the log, one commit, then dispatch in order.
            self._core.ensure_running()
            items = list(events)
            if not items:
                return 0
            positions = await self._store._core.log_many(items)
            for e, position in zip(items, positions):
                waiter = self._core.publish(e, None, None, position)
                if waiter is not None:
                    await self._admission(waiter)
            return len(items)
        it = iter(events)
        total = 0
        core = self._core
        while True:
            n, waiter = core.publish_many(it)
            total += n
            if waiter is None:
                return total
            await self._admission(waiter)

    async def publish_batch(self, events: Iterable[Any]) -> None:
        """``publish_many`` with the replaced bus's return value (None)."""
        await self.publish_many(events)

    def publish_threadsafe(self, event: Any, **kwargs: Any) -> concurrent.futures.Future[bool]:
        """Publishes from any thread; returns a ``concurrent.futures.Future[bool]``.

        Do not block on the future from the loop's own thread.
        """
        loop = self._loop
        if loop is None or not self._core.running:
            raise BusNotStarted("the bus is not started: publish_threadsafe needs a running bus")
        # The caller's context travels with the event: a sync handler running in the thread
        # pool publishes with its envelope, so correlation is inherited.
        ctx = contextvars.copy_context()
        result: concurrent.futures.Future[bool] = concurrent.futures.Future()
        pending = self._threadsafe

        def relay(task: asyncio.Task[bool]) -> None:
            if task.cancelled():  # the loop is ending (its tasks are cancelled)
                result.set_exception(
                    BusClosed("the bus's event loop ended before this event was accepted")
                )
            elif task.exception() is not None:
                result.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                result.set_result(task.result())

        def submit() -> None:
            with self._threadsafe_guard:
                if result not in pending:  # failed by stop() or the loop's end already
                    return
                pending.discard(result)
            if not result.set_running_or_notify_cancel():
                return
            try:
                task = ctx.run(loop.create_task, self.publish(event, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's future
                result.set_exception(e)
                return
            task.add_done_callback(relay)

        with self._threadsafe_guard:
            pending.add(result)
        try:
            loop.call_soon_threadsafe(submit)
        except RuntimeError:  # the loop is closed
            with self._threadsafe_guard:
                pending.discard(result)
            raise BusClosed(
                "the bus's event loop is closed: publish_threadsafe cannot reach it"
            ) from None
        return result

    def _fail_threadsafe(self) -> None:
        """Fails with ``BusClosed`` every ``publish_threadsafe`` future whose event has not
        reached the loop yet: the bus stops, or its loop ends, so it never will."""
        with self._threadsafe_guard:
            waiting = list(self._threadsafe)
            self._threadsafe.clear()
        for fut in waiting:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(
                    BusClosed("the bus stopped before this event reached its loop; not accepted")
                )

    def _on_worker_done(self, task: asyncio.Task[Any]) -> None:
        """A worker task ended without ``stop()``: its loop is shutting down (``asyncio.run``
        cancels what is left). Nothing more will reach the loop: refuse further publishes
        and fail the thread-side futures still waiting, so no caller waits forever."""
        if self._core.running:
            self._core.close_intake()
            self._fail_threadsafe()

    # ------------------------------------------------------------------- waiting

    async def drain(self, timeout: float | None = None) -> None:
        """Waits until every accepted event has been handled, retries included.

        Raises ``TimeoutError`` after ``timeout`` seconds.
        """
        self._refuse_inside_handler("drain")
        fut = self._core.drain_waiter()
        if fut is None:
            return
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            s = self._core.statistics()
            raise TimeoutError(
                f"drain timed out after {timeout}s: {s['queue_size']} queued, "
                f"{s['in_flight']} in handlers, {s['retry_queue_size']} waiting to retry"
            ) from None

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
        return self._wait_for(fut, wid, event_type, timeout)

    async def _wait_for(self, fut: asyncio.Future[Any], wid: int, event_type: Target, timeout: float | None) -> Any:
        try:
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no {getattr(event_type, '__name__', event_type)!s} event within {timeout}s"
            ) from None
        finally:
            self._core.remove_waiter(wid)

    def _refuse_inside_handler(self, what: str) -> None:
        env = current_envelope()
        if env is not None and self._loop is not None:
            raise ReentrantCall(
                f"{what}() called from inside a handler (of {env.event_type}) would wait "
                "for that handler itself; call it from outside handlers"
            )

    # ------------------------------------------------------------------- failures

    def _after_call(
        self,
        env: Envelope,
        sub_id: int,
        subscription: str,
        error: BaseException | None,
        duration_s: float | None,
        attempt: int,
        final: bool,
        park_key: int | None = None,
        parked: bool = False,
    ) -> Awaitable[Any] | None:
        position = env.position
        if parked:
            self._record_dead_letter(env, sub_id, subscription, None, attempt, None, park_key, True)
            if self._store is not None and position is not None:
                self._store._core.mark_done(subscription, position)
            return None
        result = None
        if error is not None or self._mark is not None:
            result = ProcessingResult(
                event_id=env.event_id,
                success=error is None,
                error_message=None if error is None else f"{type(error).__name__}: {error}",
                processing_time_ms=0.0 if duration_s is None else duration_s * 1000.0,
                retry_attempt=attempt - 1,
                subscription=subscription,
            )
        if error is not None:
            self._record_failure(env, sub_id, subscription, error, attempt, final, result, park_key)  # type: ignore[arg-type]
        elif attempt > 1:
            self._first_failures.pop((id(env.event), subscription), None)
        if self._mark is not None:
            return self._call_mark(env.event_id, result)
        if self._store is not None and position is not None and error is not None and final:
            # Dead-lettered: not delivered again after a restart (successes are recorded by
            # the worker itself).
            self._store._core.mark_done(subscription, position)
        return None

    def _record_failure(
        self,
        env: Envelope,
        sub_id: int,
        subscription: str,
        error: BaseException,
        attempt: int,
        final: bool,
        result: ProcessingResult,
        park_key: int | None,
    ) -> None:
        now = datetime.now(timezone.utc)
        pair = (id(env.event), subscription)
        self._first_failures.setdefault(pair, now)
        logger.error(
            "handler %s failed on %s (attempt %d%s): %s: %s [correlation_id=%s]",
            subscription,
            env.event_type,
            attempt,
            ", giving up" if final else ", will retry",
            type(error).__name__,
            error,
            env.correlation_id,
            exc_info=(type(error), error, error.__traceback__),
            extra={
                "correlation_id": env.correlation_id,
                "event_id": env.event_id,
                "causation_id": env.causation_id,
                "event_type": env.event_type,
            },
        )
        if final:
            self._record_dead_letter(env, sub_id, subscription, error, attempt, result, park_key, False)

    def _record_dead_letter(
        self,
        env: Envelope,
        sub_id: int,
        subscription: str,
        error: BaseException | None,
        attempts: int,
        result: ProcessingResult | None,
        park_key: int | None,
        parked: bool,
    ) -> None:
        now = datetime.now(timezone.utc)
        first = self._first_failures.pop((id(env.event), subscription), now)
        head = None
        if parked:
            head = next(
                (
                    e
                    for e in self.dead_letters._entries.values()
                    if e.parked_behind is None and e.key_hash == park_key
                    and e.subscription_id == f"sub-{sub_id}"
                ),
                None,
            )
            etype, message, tb = (
                "oxbus.Parked",
                f"not handled: its key is parked behind dead letter "
                f"{head.id if head else '(gone)'} of {subscription}",
                "",
            )
        else:
            assert error is not None
            cls = type(error)
            etype = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
            message = str(error)
            tb = "".join(traceback.format_exception(cls, error, error.__traceback__))
        entry = DeadLetter(
            id=self.dead_letters._next_id(), event=env.event, subscription=subscription,
            attempts=attempts, first_failed_at=first, last_failed_at=now, error_type=etype,
            error_message=message, traceback=tb, final_result=result,  # type: ignore[arg-type]
            subscription_id=f"sub-{sub_id}", position=env.position, key_hash=park_key,
            parked_behind=head.id if head else None, key=env.key,
        )
        self.dead_letters._add(entry)
        if parked:
            logger.warning("%s: %s", subscription, message)
        if self._store is not None and env.position is not None:
            fut = self._store._core.add_dead_letter(
                env.position, subscription, attempts, first.isoformat(), now.isoformat(),
                etype, message, tb, _signed(park_key), head.position if head else None,
            )

            def renamed(f: asyncio.Future[int]) -> None:
                # The stored row's id becomes the entry's, so a purge reaches the row.
                if f.cancelled() or f.exception() is not None or entry.id not in self.dead_letters._entries:
                    return
                old = entry.id
                del self.dead_letters._entries[old]
                entry.id = f"db-{f.result()}"
                self.dead_letters._entries[entry.id] = entry
                for e in self.dead_letters._entries.values():
                    if e.parked_behind == old:
                        e.parked_behind = entry.id

            fut.add_done_callback(renamed)

    async def _timed(
        self, target: Any, event: Any, timeout: float, threaded: bool, name: str
    ) -> Any:
        """A handler call with a timeout: async ones are cancelled; a thread-pool call cannot
        be, so its thread is abandoned and the pool may start a replacement."""
        cf: concurrent.futures.Future[Any] | None = None
        if threaded:
            assert self._executor is not None
            cf = self._executor.submit(contextvars.copy_context().run, target, event)
            aw: Any = asyncio.wrap_future(cf)
        else:
            aw = target
        try:
            return await asyncio.wait_for(aw, timeout)
        except asyncio.TimeoutError:
            if cf is not None and not cf.done():
                pool = self._executor
                assert pool is not None
                pool.abandon()
                cf.add_done_callback(lambda _: pool.release())
            raise TimeoutError(f"handler {name} took longer than its timeout of {timeout}s") from None

    def _call_mark(self, event_id: Any, result: Any) -> Awaitable[Any] | None:
        try:
            out = self._mark(event_id, result)  # type: ignore[misc]
        except Exception:
            logger.exception("event_storage.mark_event_processed(%r) raised", event_id)
            return None
        if inspect.isawaitable(out):
            return self._await_mark(event_id, out)
        return None

    async def _await_mark(self, event_id: Any, aw: Awaitable[Any]) -> None:
        try:
            await aw
        except Exception:
            logger.exception("event_storage.mark_event_processed(%r) raised", event_id)

    def get_failed_events(self) -> list[dict[str, Any]]:
        """Dead letters in the replaced bus's shape: dicts of event, subscription,
        final_result (the last attempt's ``ProcessingResult``) and failed_at (UTC)."""
        return [
            {
                "event": d.event,
                "subscription": self._subscription_of(d),
                "final_result": d.final_result,
                "failed_at": d.last_failed_at,
            }
            for d in self.dead_letters.list()
        ]

    def _subscription_of(self, entry: DeadLetter) -> Subscription:
        """The subscription a dead letter failed in; one rebuilt from its name when it is
        gone (a dead letter read back from the store after its handler was renamed)."""
        sid = self._sub_id(entry)
        sub = None if sid is None else self._subscriptions.get(sid)
        if sub is not None:
            return sub
        return Subscription(
            subscription_id=entry.subscription_id, event_type=None, handler=None, priority=1,
            is_async=True, retry_count=max(0, entry.attempts - 1), name=entry.subscription,
        )

    def clear_failed_events(self) -> None:
        """Empties the dead-letter queue."""
        self.dead_letters.purge()

    # --------------------------------------------------------------- statistics

    def get_statistics(self) -> dict[str, Any]:
        """Counters: events_published, events_processed, events_failed (handler calls that
        raised), retried, dead_lettered, avg_processing_time_ms, handler_latency_ms
        (p50/p90/p99/max), queue_size, retry_queue_size, failed_events_count,
        subscription_count, is_running, worker_count, by_event_type, uptime_seconds."""
        s: dict[str, Any] = self._core.statistics()
        s["failed_events_count"] = len(self.dead_letters)
        return s

    def get_stats(self) -> dict[str, Any]:
        """The short form of seed 003's bus: published, received, processed, failed."""
        s = self._core.statistics()
        return {
            "published": s["events_published"],
            "received": s["events_processed"] + s["in_flight"],
            "processed": s["events_processed"],
            "failed": s["events_failed"],
            "queue_size": s["queue_size"],
            "is_running": s["is_running"],
        }

    def get_health_status(self) -> dict[str, Any]:
        """``status`` (healthy / degraded / stopped, with ``reasons``), queue_size,
        worker_count, in_flight, lanes, oldest queued age, memory_usage_mb, cpu_percent,
        system memory, error rate, dead letters and the thresholds used."""
        h: dict[str, Any] = self._core.health()
        if self._redis is not None:
            ok, lag, pending, published, received, claimed, dead, err = self._redis.health()
            h["transport"] = {
                "kind": "redis", "reachable": ok, "lag": lag, "pending": pending,
                "published": published, "received": received, "claimed": claimed,
                "dead_lettered": dead, "last_error": err,
            }
            if not ok and h["status"] == "healthy":
                h["status"] = "degraded"
                h["reasons"].append(f"Redis unreachable: {err}")
        pool = self._executor
        h["abandoned_threads"] = 0 if pool is None else pool.abandoned
        h["abandoned_threads_total"] = 0 if pool is None else pool.abandoned_total
        h["thread_pool_size"] = 0 if pool is None else pool.size
        h["heartbeats"] = {} if self._heartbeats is None else self._heartbeats.report()
        if pool is not None and pool.abandoned >= pool.size and h["status"] == "healthy":
            h["status"] = "degraded"
            h["reasons"].append(
                f"{pool.abandoned} thread-pool handler calls overran their timeout and still run"
            )
        return h

    def metrics(self) -> str:
        """The bus's metrics in the Prometheus text format (see ``oxbus.metrics``)."""
        from oxbus.metrics import render  # prometheus_client is imported on first use

        return render(self)

    async def broadcast_heartbeat(self, source: str, interval: float) -> _heartbeat.HeartbeatHandle:
        """Publishes an ``oxbus.Heartbeat`` of ``source`` now and every ``interval`` seconds
        (on the bus's clock) until the bus stops or ``handle.cancel()``; health lists the last
        heartbeat seen per source (see ``oxbus.heartbeat``)."""
        return await _heartbeat.watch(self).broadcast(source, interval)

    def __repr__(self) -> str:
        s = self._core.statistics()
        return (
            f"<{type(self).__name__} {'running' if s['is_running'] else 'stopped'} "
            f"workers={s['worker_count']} queued={s['queue_size']} "
            f"published={s['events_published']} processed={s['events_processed']}>"
        )


class InMemoryEventBus(EventBus):
    """The name of the bus being replaced: ``InMemoryEventBus(worker_count=4)`` is
    ``EventBus(workers=4)``."""


class EventBusFactory:
    """The replaced bus's factory."""

    @staticmethod
    def create_in_memory_event_bus(worker_count: int = 1, **kwargs: Any) -> InMemoryEventBus:
        """An in-memory bus with ``worker_count`` workers."""
        return InMemoryEventBus(worker_count=worker_count, **kwargs)


class EventBusManager:
    """Starts a bus on entry and stops it (draining) on exit::

    async with EventBusManager(bus) as started:
        await started.publish(event)
    """

    def __init__(self, event_bus: EventBus) -> None:
        self.event_bus = event_bus

    async def __aenter__(self) -> EventBus:
        await self.event_bus.start()
        return self.event_bus

    async def __aexit__(self, *exc: object) -> None:
        await self.event_bus.stop()
