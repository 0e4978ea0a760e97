"""How a bus hands its events to its transport: one small backend per kind, so the bus
itself has no branch per backend.

- :class:`Backend`: into the engine's queue (``oxbus.Memory``); the base of the others;
- :class:`EventStorageBackend`: ``event_storage.store_event(event)`` first, as the bus being
  replaced did, then into the queue;
- :class:`DurableBackend`: committed to the SQLite log, then into the queue (``oxbus.Sqlite``);
- :class:`BrokerBackend`: any broker (``oxbus.RedisStreams``, ``oxbus.RabbitMQ``): published to it, and back
  through the consumer group.

A new broker is one Rust file in ``src/transport`` and its options class (a ``Broker``) in
``oxbus.transports``: this module does not change.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import datetime
from typing import Any, Awaitable, ClassVar, Iterable

from oxbus._oxbus import BusCore, TransportCore
from oxbus.dead_letters import DeadLetters
from oxbus.errors import BusNotStarted, NotConsuming, OxbusError
from oxbus.store import SqliteEventStore
from oxbus.transports import Broker, Memory, Sqlite, Transport, binding_keys

__all__ = ["Backend", "backend_for"]

logger = logging.getLogger("oxbus")


async def admit(core: BusCore, waiter: asyncio.Future[Any]) -> None:
    """Waits for room in a full queue. The event enters the queue when this publisher
    resumes, not when room is found: a publisher cancelled in between has not published
    (its room goes to the next one), as ``CancelledError`` tells it."""
    try:
        await waiter
    except BaseException:
        core.withdraw(waiter)
        raise
    core.enter(waiter)


class Backend:
    """The in-memory backend, and the base of the others: events go into the engine's queue."""

    #: whether ``await bus.publish()`` may call the engine directly (no hook, no I/O)
    plain: ClassVar[bool] = True

    def __init__(self, core: BusCore, options: Transport) -> None:
        self.core = core
        self.options = options

    async def start(self) -> None:
        """After the workers started; a failure leaves the bus stopped."""

    def pause(self) -> None:
        """Intake closed: take nothing new from the transport."""

    async def close(self) -> None:
        """After the workers stopped: release the transport."""

    def subscribed(self, target: Any) -> None:
        """A subscription to ``target`` was made (before or while the bus runs); raises
        when its events could never reach it."""

    async def ready(self) -> None:
        """Waits until every subscription made so far gets the transport's events."""

    def health(self, report: dict[str, Any]) -> None:
        """Adds the transport's part to ``get_health_status()``'s report."""

    def statistics(self, stats: dict[str, Any]) -> None:
        """Adds the transport's part to ``get_statistics()``."""

    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool:
        waiter = self.core.publish(event, key, correlation_id)
        if waiter is not None:
            await admit(self.core, waiter)
        return True

    async def publish_many(self, events: Iterable[Any]) -> int:
        it = iter(events)
        total = 0
        core = self.core
        while True:
            n, waiter = core.publish_many(it)
            total += n
            if waiter is None:
                return total
            await admit(core, waiter)

    def publish_nowait(self, event: Any, key: Any, correlation_id: Any) -> None:
        self.core.publish_nowait(event, key, correlation_id)



class _Waiting(Backend):
    """A backend whose publish waits for I/O: no ``publish_nowait``."""

    plain = False

    def publish_nowait(self, event: Any, key: Any, correlation_id: Any) -> None:
        raise OxbusError("publish_nowait cannot wait for the store or a broker; use publish")


class EventStorageBackend(_Waiting):
    """The replaced bus's ``event_storage``: ``await store_event(event)``, then the queue."""

    def __init__(self, core: BusCore, options: Transport, event_storage: Any) -> None:
        super().__init__(core, options)
        self.storage = event_storage

    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool:
        self.core.ensure_running()  # never store an event the bus then refuses
        await self.storage.store_event(event)
        return await super().publish(event, key, correlation_id)

    async def publish_many(self, events: Iterable[Any]) -> int:
        n = 0
        for e in events:
            await self.publish(e, None, None)
            n += 1
        return n


class DurableBackend(_Waiting):
    """The SQLite log: an event is committed, then dispatched with its position."""

    def __init__(
        self,
        core: BusCore,
        options: Sqlite,
        dead_letters: DeadLetters,
        durable: dict[int, tuple[str, bool]],
    ) -> None:
        super().__init__(core, options)
        self.store, self.owns_store = options.open()
        dead_letters._attach(self.store)
        self.dead_letters = dead_letters
        self.durable = durable
        core.set_progress(self.store._core)

    async def start(self) -> None:
        """Queues, for each subscription, every committed event it has not finished (in log
        order), and loads the stored dead letters."""
        # Every event read here stays alive (it is queued): the cycle collector would only
        # traverse them again and again (a third of a restart's time with 100k events).
        collecting = gc.isenabled()
        gc.disable()
        try:
            await self._recover()
        finally:
            if collecting:
                gc.enable()

    async def _recover(self) -> None:
        store = self.store
        targets = {sid: target for sid, _, _, target in self.core.subscriptions()}
        owed = 0
        pending: list[tuple[int, int, Any, Any, Any]] = []
        for sid, (name, from_beginning) in list(self.durable.items()):
            start_after = await store._core.register_subscription(name, from_beginning)
            # A row that cannot be decoded becomes a dead letter of this subscription.
            for position, event, corr, cause in await store._undelivered(
                name, start_after, targets.get(sid)
            ):
                pending.append((position, sid, event, corr, cause))
        # In log order across subscriptions: a saga's steps are several subscriptions, and
        # its instance must see their events in the order they were published.
        pending.sort(key=lambda p: p[0])
        redeliver = self.core.redeliver
        for position, sid, event, corr, cause in pending:
            owed += bool(redeliver(event, sid, position, corr, cause))
        await self.dead_letters._load()
        logger.info(
            "durable recovery: %d undelivered (event, subscription) pair(s) queued for %d "
            "subscription(s); %d dead letter(s) loaded",
            owed, len(self.durable), len(self.dead_letters),
        )

    async def close(self) -> None:
        if self.owns_store:
            await self.store._core.close_async()  # never waits on the loop thread

    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool:
        self.core.ensure_running()  # never commit an event the bus then refuses
        store = self.store._core
        # Committed at once on this thread when nothing waits before it (an int), else a
        # future; either way dispatched only once committed, in publish order.
        logged = store.log(event, key, correlation_id)
        if isinstance(logged, int):
            waiter = self.core.publish(event, key, correlation_id, logged)
        else:
            try:
                (position,) = await logged
                waiter = self.core.publish(event, key, correlation_id, position)
            finally:
                store.settled()  # dispatched (or given up): later publishes may go ahead
        if waiter is not None:
            await admit(self.core, waiter)
        return True

    async def publish_many(self, events: Iterable[Any]) -> int:
        # One atomic group in the log, one commit, then dispatch in order.
        self.core.ensure_running()
        items = list(events)
        if not items:
            return 0
        store = self.store._core
        logged = store.log_many(items)
        try:
            positions = await logged
            for e, position in zip(items, positions):
                waiter = self.core.publish(e, None, None, position)
                if waiter is not None:
                    await admit(self.core, waiter)
        finally:
            store.settled()
        return len(items)


def _event_from_payload(payload: dict[str, Any]) -> Any:
    """An event read from a transport: the user's class through the registry, else the data."""
    from oxbus.registry import lookup, rebuild

    data = payload.get("data", {})
    cls = lookup(payload.get("event_type"))
    if cls is None:
        return data
    obj: Any = rebuild(cls, data)
    d = getattr(obj, "__dict__", None)
    if d is not None and getattr(cls, "__oxbus_domain_event__", False):
        d["event_id"] = payload.get("event_id")
        if payload.get("occurred_at"):
            d["occurred_at"] = datetime.fromisoformat(payload["occurred_at"])
        for k, v in (payload.get("metadata") or {}).items():
            if v is not None:
                d[k] = v
    return obj


class BrokerBackend(_Waiting):
    """A broker (``oxbus.RedisStreams``, ``oxbus.RabbitMQ``): a publish returns once the broker confirmed the
    event; messages come back through this member's consumer group and are dispatched like
    local events, each acknowledged once every subscription finished it. Every broker is
    driven the same way: its options connect a native ``TransportCore``."""

    options: Broker

    def __init__(self, core: BusCore, options: Broker, dead_letters: DeadLetters) -> None:
        super().__init__(core, options)
        self.broker: TransportCore | None = None
        self.consuming = False
        self.dead_letters = dead_letters
        # Bindings asked for by subscriptions made while the bus runs, not yet applied; the
        # error of one that failed, until ready() reports it.
        self._binding: set[asyncio.Future[Any]] = set()
        self._bind_error: BaseException | None = None
        self._warned_no_consume = False

    async def start(self) -> None:
        consume = self.options.consume
        if consume is None:  # a bus with subscriptions joins its group
            consume = bool(self.core.subscriptions())
        targets = [target for _, _, _, target in self.core.subscriptions()]
        broker = await self.options.connect(consume, targets)
        place = self.options.dead_letter_place()
        if consume and place is not None:
            # The group's dead letters are on the broker: bus.dead_letters lists them. Read
            # before messages are dispatched (they wait in the inbox meanwhile).
            self.dead_letters._attach_broker(place, _event_from_payload, self._flush)
            try:
                n = await self.dead_letters.refresh()
            except OxbusError as e:  # the bus runs; the list is read at the next refresh()
                logger.warning("%s dead letters not read at start: %s", self.options.title, e)
            else:
                logger.info("%s: %d dead letter(s) in the group's dead-letter place",
                            self.options.title, n)
        self.broker = broker
        self.consuming = consume
        targets = [target for _, _, _, target in self.core.subscriptions()]
        if consume:  # subscriptions made while connecting
            self._bind(targets)
        elif targets and self.options.consume is None:
            logger.warning(
                "%s: %d subscription(s) made while the bus was connecting, after it decided "
                "not to join its group (none then): they receive nothing; subscribe before "
                "start(), or make the bus with consume=True", self.options.title, len(targets),
            )
        self.broker.set_target(asyncio.get_running_loop(), self._on_messages)
        logger.info("%s transport connected: %r (consuming: %s)", self.options.title,
                    self.options, consume)

    def subscribed(self, target: Any) -> None:
        """While the bus runs: routes the subscription's events to the group (RabbitMQ binds
        its queue; the bus's own later publishes are routed by it at once, ``ready()`` waits
        for the broker's answer). A bus that did not join its group refuses it (its handler
        would never run), unless it was made with ``consume=False``."""
        if self.broker is None:
            return  # not started (or still connecting: start() binds it)
        if not self.consuming:
            if self.options.consume is None:
                raise NotConsuming(
                    f"this bus started without subscriptions, so it did not join its "
                    f"{self.options.title} group {getattr(self.options, 'group', '')!r} "
                    f"(consume=None joins only when there are subscriptions at start()): a "
                    f"handler subscribed now would never receive the broker's events. "
                    f"Subscribe before start(), or make the bus with consume=True"
                )
            if not self._warned_no_consume:
                self._warned_no_consume = True
                logger.warning(
                    "%s bus made with consume=False: subscriptions get no events from the "
                    "broker (subscription to %r)", self.options.title, target,
                )
            return
        self._bind([target])

    def _bind(self, targets: list[Any]) -> None:
        assert self.broker is not None
        fut = self.broker.bind(binding_keys(targets))
        if fut is not None:
            self._binding.add(fut)
            fut.add_done_callback(self._bound)

    def _bound(self, fut: asyncio.Future[Any]) -> None:
        self._binding.discard(fut)
        if fut.cancelled():
            return
        e = fut.exception()
        if e is not None:
            self._bind_error = e
            logger.error(
                "%s: binding a subscription's pattern failed (bound again on the next "
                "connection): %s", self.options.title, e,
            )

    async def ready(self) -> None:
        while self._binding:
            await asyncio.gather(*self._binding, return_exceptions=True)
        e, self._bind_error = self._bind_error, None
        if e is not None:
            raise e

    def _flush(self) -> Awaitable[None] | None:
        """Waits until the dead letters this bus wrote reached the broker (None: not
        connected)."""
        return None if self.broker is None else self.broker.flush()

    def _on_messages(self) -> None:
        # Messages that arrive while the bus stops stay unacknowledged: the broker delivers
        # them again.
        if self.broker is not None and self.core.running:
            _, refused = self.broker.dispatch(self.core, _event_from_payload)
            for reason in refused:
                logger.error("%s %s: moved to the dead-letter place", self.options.title, reason)

    def pause(self) -> None:
        if self.broker is not None:
            self.broker.pause()  # take no new messages; drain what was received

    async def close(self) -> None:
        if self.broker is not None:
            broker, self.broker = self.broker, None
            await broker.stop()
            for fut in list(self._binding):  # the transport answers no more
                fut.cancel()

    def _connected(self) -> TransportCore:
        self.core.ensure_running()
        if self.broker is None:
            raise BusNotStarted(
                f"the bus is still connecting to {self.options.title}: await bus.start() first"
            )
        return self.broker

    async def publish(self, event: Any, key: Any = None, correlation_id: Any = None) -> bool:
        await self._connected().publish(event, key, correlation_id)
        return True

    async def publish_many(self, events: Iterable[Any]) -> int:
        broker = self._connected()
        items = list(events)
        if items:
            await broker.publish_many(items)  # one request, one future
        return len(items)

    def health(self, report: dict[str, Any]) -> None:
        if self.broker is None:
            return
        transport = report["transport"] = self.broker.health()
        transport["partitions"] = self._partitions(transport)
        if not transport["reachable"] and report["status"] == "healthy":
            report["status"] = "degraded"
            report["reasons"].append(
                f"{self.options.title} unreachable: {transport['last_error']}"
            )

    def statistics(self, stats: dict[str, Any]) -> None:
        if self.broker is not None:
            stats["partitions"] = self._partitions(self.broker.health())

    def _partitions(self, transport: dict[str, Any]) -> dict[str, Any]:
        """``count``; ``leased`` (each partition read by one member of the group at a time);
        ``owned``: the partitions (indexes) this member reads; with leases, the group's live
        ``members`` and ``assignment`` (each partition's holder, ``None`` while free) as of
        the last heartbeat. Takes ``owned``, ``members`` and ``assignment`` out of
        ``transport``, the native reading."""
        count = getattr(self.options, "partitions", 1)
        leased = self.consuming and count > 1
        owned = transport.pop("owned", [])
        members = transport.pop("members", [])
        assignment = transport.pop("assignment", [])
        if not leased:
            owned = list(range(count)) if self.consuming else []
        return {
            "count": count, "leased": leased, "owned": owned, "members": members,
            "assignment": assignment,
        }


def backend_for(
    core: BusCore,
    options: Transport,
    event_storage: Any,
    dead_letters: DeadLetters,
    durable: dict[int, tuple[str, bool]],
) -> Backend:
    """The backend of a bus's transport options."""
    if isinstance(options, Sqlite):
        return DurableBackend(core, options, dead_letters, durable)
    if isinstance(options, Broker):
        return BrokerBackend(core, options, dead_letters)
    if event_storage is not None:
        return EventStorageBackend(core, options, event_storage)
    assert isinstance(options, Memory), options
    return Backend(core, options)


def store_of(backend: Backend) -> SqliteEventStore | None:
    """The SQLite store of a durable bus, else None."""
    return backend.store if isinstance(backend, DurableBackend) else None
