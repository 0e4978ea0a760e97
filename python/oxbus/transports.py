"""Where a bus's events travel: the transport options given to ``EventBus(transport=...)``.

One class per kind, each checking its settings once, when it is made (a bad one raises
``ConfigurationError`` naming it), and frozen afterwards:

```python
EventBus()                                              # Memory(): in this process
EventBus(transport=oxbus.Sqlite("events.db", synchronous="full"))   # the durable bus
EventBus(transport=oxbus.RedisStreams("redis://127.0.0.1:6379/0", group="billing"))
EventBus(transport="redis://127.0.0.1:6379/0", group="billing")     # the same, by URL
EventBus(transport=oxbus.RabbitMQ("amqp://guest:guest@127.0.0.1:5672/%2f", group="billing"))
```

A URL stands for the class its scheme names, with the bus's keywords as its settings
(``store=`` stands for [`Sqlite`][oxbus.transports.Sqlite]). A new broker is one more
[`Broker`][oxbus.transports.Broker] here (its URL schemes in ``schemes``, its ``connect``) plus
its Rust transport in ``src/transport``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, fields
from collections.abc import Iterable
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Union

from oxbus.config import choice, non_negative_int, positive_int, seconds
from oxbus.errors import ConfigurationError
from oxbus.store import SqliteEventStore

if TYPE_CHECKING:
    from oxbus._oxbus import TransportCore

__all__ = [
    "Broker", "Memory", "RabbitMQ", "RedisStreams", "Sqlite", "Transport", "TransportSpec",
]


def redact(url: str) -> str:
    """``url`` with its password masked: ``redis://:***@host:6379/0``."""
    return re.sub(r"(://[^/@]*?:)[^/@]*@", r"\1***@", url)


def _refuse_unknown(
    kind: type[Transport], url: str, settings: dict[str, Any], allowed: set[str]
) -> None:
    unknown = sorted(set(settings) - allowed)
    if unknown:
        verb = "does" if len(unknown) == 1 else "do"
        raise ConfigurationError(
            f"{', '.join(unknown)} {verb} not apply to a {kind.kind} transport ({redact(url)!r})"
        )


class Transport:
    """Base of the transport options (``Memory``, ``Sqlite``, ``RedisStreams``)."""

    __slots__ = ()
    #: the URL schemes that stand for this transport
    schemes: ClassVar[tuple[str, ...]] = ()
    #: its name in health reports and messages
    kind: ClassVar[str] = ""

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> Transport:
        """The options a URL stands for: ``Transport.from_url("redis://h:6379/0", group="g")``.

        Settings the class does not take raise ``ConfigurationError``.
        """
        if not isinstance(url, str):
            raise ConfigurationError(f"transport must be a URL or transport options, got {url!r}")
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        for option in _KINDS:
            if scheme in option.schemes:
                return option._from_url(url, settings)
        known = ", ".join(f"{s}://" for k in _KINDS for s in k.schemes)
        raise ConfigurationError(
            f"transport URL must start with one of {known}; got {redact(url)!r}"
        )

    @classmethod
    def _from_url(cls, url: str, settings: dict[str, Any]) -> Transport:
        _refuse_unknown(cls, url, settings, set())
        return cls()


@dataclass(frozen=True)
class Memory(Transport):
    """Events stay in this process (the default): ``EventBus(transport=oxbus.Memory())``."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    kind: ClassVar[str] = "memory"


@dataclass(frozen=True, init=False)
class Sqlite(Transport):
    """The durable bus: every event is committed to a SQLite log before it is dispatched.

    ``path`` is a file path (the bus opens the store on construction and closes it when it stops) or
    an open [`SqliteEventStore`][oxbus.SqliteEventStore] (used as it is, never closed by the bus).
    ``synchronous="normal"`` survives a process crash; ``"full"`` survives power loss (``None``: the
    store's own setting, ``"normal"`` for a path):

    ```python
    EventBus(transport=oxbus.Sqlite("events.db", synchronous="full"), workers=4)
    ```
    """

    path: Union[str, SqliteEventStore]
    synchronous: Union[str, None]
    schemes: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = "sqlite"

    def __init__(
        self, path: str | os.PathLike[str] | SqliteEventStore, *, synchronous: str | None = None
    ) -> None:
        if isinstance(path, SqliteEventStore):
            if synchronous is not None:
                raise ConfigurationError(
                    f"synchronous={synchronous!r} applies to a path; the open store "
                    f"{path.path!r} keeps its own setting"
                )
        elif isinstance(path, (str, os.PathLike)) and os.fspath(path):
            path = os.fspath(path)
        else:
            raise ConfigurationError(
                f"store must be a SqliteEventStore or a file path, got {path!r}"
            )
        if synchronous is not None:
            synchronous = choice("synchronous", synchronous.lower() if isinstance(synchronous, str)
                                 else synchronous, ("normal", "full"))
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "synchronous", synchronous)

    def open(self) -> tuple[SqliteEventStore, bool]:
        """The store, and whether the bus opened it (and so closes it)."""
        if isinstance(self.path, SqliteEventStore):
            return self.path, False
        return SqliteEventStore(self.path, synchronous=self.synchronous or "normal"), True


class Broker(Transport):
    """Base of the options of a transport over a message broker: events travel between
    processes, and come back through this member's consumer group."""

    __slots__ = ()
    #: the broker's name in messages ("Redis")
    title: ClassVar[str] = ""
    #: whether the bus reads from its group (``None``: when it has subscriptions at start)
    consume: Union[bool, None]

    async def connect(self, consume: bool, targets: Iterable[Any] = ()) -> TransportCore:
        """The native transport, connected on the engine's runtime (the loop thread never
        waits for the broker); ``consume``: whether to join the consumer group; ``targets``:
        what the bus's subscriptions name (classes, type keys, patterns, Enum members), for a
        broker that routes by type (RabbitMQ binds its queue with them)."""
        raise NotImplementedError

    def dead_letter_place(self) -> dict[str, Any] | None:
        """Where the group's dead letters are on the broker, for ``bus.dead_letters`` and
        ``oxbus dlq`` (``None``: not read back from this broker)."""
        return None

    def _check(
        self, url: Any, url_text: str, names: dict[str, Any], optional: tuple[str, Any],
        consume: Any,
    ) -> None:
        """Raises ``ConfigurationError`` unless ``url`` is a URL of one of ``schemes``
        (``url_text`` names them), each of ``names`` a non-empty str, the ``optional`` one a
        non-empty str or None, and ``consume`` True, False or None."""
        if not isinstance(url, str) or not url.lower().startswith(
            tuple(f"{s}://" for s in self.schemes)
        ):
            shown = redact(url) if isinstance(url, str) else url
            raise ConfigurationError(f"transport must be {url_text} URL, got {shown!r}")
        for name, value in names.items():
            if not isinstance(value, str) or not value:
                raise ConfigurationError(f"{name} must be a non-empty str, got {value!r}")
        name, value = optional
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(f"{name} must be a non-empty str or None, got {value!r}")
        if consume is not None and not isinstance(consume, bool):
            raise ConfigurationError(f"consume must be True, False or None, got {consume!r}")

    def _set(self, checked: dict[str, Any]) -> None:
        """Sets the (frozen) fields to their checked values."""
        for field_name, checked_value in checked.items():
            object.__setattr__(self, field_name, checked_value)


@dataclass(frozen=True, init=False, repr=False)
class RedisStreams(Broker):
    """Redis Streams with consumer groups: events travel between processes.

    ``url`` is ``redis://``, ``rediss://`` (TLS) or ``unix://``. ``group``: processes in one
    group share the events, each group gets every event. ``consumer``: this process's name in
    the group (``None``: ``<hostname>-<pid>`` when the bus starts). ``stream``: the stream
    name, ``<stream>:<i>`` for each of ``partitions`` streams (a key always goes to the same
    one). ``claim_idle``: seconds after which entries pending on a silent consumer are claimed.
    ``maxlen``: the ``MAXLEN ~`` bound (0 = unbounded). ``max_deliveries``: an entry delivered
    that many times goes to ``<stream>:dead``. ``publish_timeout``: seconds a publish retries
    before ``TransportError``. ``prefetch``: entries delivered and not yet acknowledged.
    ``consume``: whether the bus reads from its group (``None``: when it has subscriptions at
    ``start()``). ``lease_ttl``: with ``partitions`` > 1, each partition is read by one member
    of the group at a time, holding a lease it renews every third of ``lease_ttl`` seconds (and
    at least every second); a member that dies loses its partitions after ``lease_ttl``
    seconds (0.1 to 86400, default 10):

    ```python
    EventBus(transport=oxbus.RedisStreams("redis://127.0.0.1:6379/0", group="billing",
                                          partitions=4))
    ```
    """

    url: str
    group: str
    consumer: Union[str, None]
    stream: str
    partitions: int
    claim_idle: float
    maxlen: int
    max_deliveries: int
    publish_timeout: float
    prefetch: int
    consume: Union[bool, None]
    lease_ttl: float
    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix")
    kind: ClassVar[str] = "redis"
    title: ClassVar[str] = "Redis"

    def __init__(
        self,
        url: str,
        *,
        group: str = "default",
        consumer: str | None = None,
        stream: str = "oxbus:events",
        partitions: int = 1,
        claim_idle: float = 30.0,
        maxlen: int = 1_000_000,
        max_deliveries: int = 5,
        publish_timeout: float = 5.0,
        prefetch: int = 1000,
        consume: bool | None = None,
        lease_ttl: float = 10.0,
    ) -> None:
        self._check(
            url, "a redis:// (or rediss://, unix://)", {"group": group, "stream": stream},
            ("consumer", consumer), consume,
        )
        self._set({
            "url": url,
            "group": group,
            "consumer": consumer,
            "stream": stream,
            "partitions": positive_int("partitions", partitions),
            "claim_idle": seconds("claim_idle", claim_idle),
            "maxlen": non_negative_int("maxlen", maxlen, " (0 = unbounded)"),
            "max_deliveries": positive_int("max_deliveries", max_deliveries),
            "publish_timeout": seconds("publish_timeout", publish_timeout),
            "prefetch": positive_int("prefetch", prefetch),
            "consume": consume,
            "lease_ttl": _lease_ttl(lease_ttl),
        })

    @classmethod
    def _from_url(cls, url: str, settings: dict[str, Any]) -> Transport:
        _refuse_unknown(cls, url, settings, {f.name for f in fields(cls)} - {"url"})
        return cls(url, **settings)

    def __repr__(self) -> str:  # the URL's password never appears in messages
        shown = ", ".join(
            f"{f.name}={redact(self.url) if f.name == 'url' else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"RedisStreams({shown})"

    def streams(self) -> list[str]:
        """The stream names: ``stream``, or ``<stream>:<i>`` for each partition."""
        if self.partitions == 1:
            return [self.stream]
        return [f"{self.stream}:{i}" for i in range(self.partitions)]

    async def connect(self, consume: bool, targets: Iterable[Any] = ()) -> TransportCore:
        from oxbus._oxbus import TransportCore

        return await TransportCore.redis(self.native(consume))

    def dead_letter_place(self) -> dict[str, Any]:
        """The group's entries in the dead-letter stream, ``<stream>:dead``."""
        return {
            "kind": self.kind, "url": self.url, "stream": f"{self.stream}:dead",
            "group": self.group,
        }

    def native(self, consume: bool) -> dict[str, Any]:
        """The settings of the native transport, by name."""
        return {
            "url": self.url,
            "streams": self.streams(),
            "group": self.group,
            "consumer": self.consumer or f"{socket.gethostname()}-{os.getpid()}",
            "claim_idle": self.claim_idle,
            "maxlen": self.maxlen,
            "prefetch": self.prefetch,
            "max_deliveries": self.max_deliveries,
            "dead_stream": f"{self.stream}:dead",
            "publish_timeout": self.publish_timeout,
            "consume": consume,
            # Partition leases: one member per partition at a time (per-key order across
            # processes); a single stream is shared by every member.
            "stream": self.stream,
            "lease_ttl": self.lease_ttl if self.partitions > 1 else None,
        }


def _lease_ttl(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.1 <= value <= 86_400
    ):
        raise ConfigurationError(
            f"lease_ttl must be a number of seconds from 0.1 to 86400, got {value!r}"
        )
    return float(value)


def binding_keys(targets: Iterable[Any]) -> list[str]:
    """The routing patterns a group's queue is bound with, from its subscriptions' targets: a
    string or an Enum member's value as it is (our patterns are AMQP's), a class as its type
    key and those of its subclasses defined so far (``object`` binds ``#``: everything)."""
    from oxbus.registry import type_key

    keys: set[str] = set()
    for t in targets:
        if isinstance(t, Enum):
            t = t.value
        if isinstance(t, type):
            if t is object:
                return ["#"]
            seen, todo = set(), [t]
            while todo:
                cls = todo.pop()
                if cls not in seen:
                    seen.add(cls)
                    keys.add(type_key(cls))
                    todo.extend(cls.__subclasses__())
        else:
            keys.add(str(t))
    return sorted(keys)


@dataclass(frozen=True, init=False, repr=False)
class RabbitMQ(Broker):
    """RabbitMQ (AMQP 0.9.1): a durable topic exchange, one durable queue per group.

    ``url`` is ``amqp://user:password@host:5672/vhost`` (``%2f`` is the vhost ``/``) or
    ``amqps://`` (TLS). Events are published to ``exchange`` (a durable topic exchange) with
    their type key as routing key; ``group``'s queue (``queue``, default
    ``<exchange>.<group>``) is bound with the patterns of the bus's subscriptions: processes in
    one group share its messages, each group gets every event. ``partitions``: N queues fed by
    a consistent-hash exchange on the key, each with a single active consumer (per-key order
    across processes). ``prefetch``: messages delivered and not yet acknowledged
    (``basic.qos``, at most 65535). ``max_deliveries``: a message delivered that many times
    goes to ``<queue>.dead``. ``connect_timeout`` / ``publish_timeout``: seconds before
    ``TransportError``. ``consume``: whether the bus reads its group's queue (``None``: when it
    has subscriptions at ``start()``; ``True``: also with none yet). A subscription made while
    the bus runs binds its pattern too (``await bus.ready()`` waits for RabbitMQ's answer);
    bindings are never removed (the group's members share the queue):

    ```python
    EventBus(transport=oxbus.RabbitMQ("amqp://guest:guest@127.0.0.1:5672/%2f",
                                      group="billing", partitions=4))
    ```
    """

    url: str
    group: str
    exchange: str
    queue: Union[str, None]
    partitions: int
    prefetch: int
    max_deliveries: int
    connect_timeout: float
    publish_timeout: float
    consume: Union[bool, None]
    schemes: ClassVar[tuple[str, ...]] = ("amqp", "amqps")
    kind: ClassVar[str] = "rabbitmq"
    title: ClassVar[str] = "RabbitMQ"

    def __init__(
        self,
        url: str,
        *,
        group: str = "default",
        exchange: str = "oxbus.events",
        queue: str | None = None,
        partitions: int = 1,
        prefetch: int = 1000,
        max_deliveries: int = 5,
        connect_timeout: float = 5.0,
        publish_timeout: float = 5.0,
        consume: bool | None = None,
    ) -> None:
        self._check(
            url, "an amqp:// (or amqps://)", {"group": group, "exchange": exchange},
            ("queue", queue), consume,
        )
        prefetch = positive_int("prefetch", prefetch)
        if prefetch > 65535:
            raise ConfigurationError(
                f"prefetch must be at most 65535 (AMQP's basic.qos), got {prefetch!r}"
            )
        self._set({
            "url": url,
            "group": group,
            "exchange": exchange,
            "queue": queue,
            "partitions": positive_int("partitions", partitions),
            "prefetch": prefetch,
            "max_deliveries": positive_int("max_deliveries", max_deliveries),
            "connect_timeout": seconds("connect_timeout", connect_timeout),
            "publish_timeout": seconds("publish_timeout", publish_timeout),
            "consume": consume,
        })

    @classmethod
    def _from_url(cls, url: str, settings: dict[str, Any]) -> Transport:
        _refuse_unknown(cls, url, settings, {f.name for f in fields(cls)} - {"url"})
        return cls(url, **settings)

    def __repr__(self) -> str:  # the URL's password never appears in messages
        shown = ", ".join(
            f"{f.name}={redact(self.url) if f.name == 'url' else getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"RabbitMQ({shown})"

    @property
    def queue_name(self) -> str:
        """The group's queue: ``queue``, else ``<exchange>.<group>`` (``<name>.<i>`` per
        partition, ``<name>.dead`` for dead letters)."""
        return self.queue or f"{self.exchange}.{self.group}"

    async def connect(self, consume: bool, targets: Iterable[Any] = ()) -> TransportCore:
        from oxbus._oxbus import TransportCore

        return await TransportCore.rabbitmq(self.native(consume, targets))

    def dead_letter_place(self) -> dict[str, Any]:
        """The group's dead-letter queue, ``<queue>.dead``."""
        return {"kind": self.kind, "url": self.url, "queue": f"{self.queue_name}.dead"}

    def native(self, consume: bool, targets: Iterable[Any] = ()) -> dict[str, Any]:
        """The settings of the native transport, by name."""
        return {
            "url": self.url,
            "exchange": self.exchange,
            "group": self.group,
            "queue": self.queue_name,
            "partitions": self.partitions,
            "bindings": binding_keys(targets),
            "prefetch": self.prefetch,
            "max_deliveries": self.max_deliveries,
            "connect_timeout": self.connect_timeout,
            "publish_timeout": self.publish_timeout,
            "consume": consume,
        }


#: The transports a URL may name, in the order their schemes are tried.
_KINDS: tuple[type[Transport], ...] = (Memory, RedisStreams, RabbitMQ)

#: What ``EventBus(transport=...)`` takes.
TransportSpec = Union[str, Transport]

#: The ``EventBus`` keywords that are settings of a URL's transport (``RedisStreams``'s and
#: ``RabbitMQ``'s; a URL's class refuses those it does not take).
URL_KEYWORDS = (
    "group", "consumer", "stream", "partitions", "claim_idle", "maxlen", "max_deliveries",
    "publish_timeout", "prefetch", "consume", "lease_ttl", "exchange", "queue", "connect_timeout",
)


def resolve(
    transport: TransportSpec | None,
    store: SqliteEventStore | str | os.PathLike[str] | None,
    event_storage: Any,
    shorthand: dict[str, Any],
) -> Transport:
    """The transport options an ``EventBus``'s keywords stand for.

    ``shorthand`` holds the ``URL_KEYWORDS`` given to the bus (not None): they are the settings
    of a URL's transport; beside an options object they are refused (they belong inside it);
    with no transport at all they are ignored, as they always were.
    """
    if store is not None:
        if transport is not None:
            raise ConfigurationError("give store= or transport=, not both")
        transport = Sqlite(store)
    elif isinstance(transport, str):
        transport = Transport.from_url(transport, **shorthand)
    elif transport is None:
        transport = Memory()
    elif not isinstance(transport, Transport):
        raise ConfigurationError(
            f"transport must be a URL or transport options (oxbus.Memory, oxbus.Sqlite, "
            f"oxbus.RedisStreams, oxbus.RabbitMQ), got {transport!r}"
        )
    elif shorthand:
        raise ConfigurationError(
            f"give {', '.join(sorted(shorthand))} inside {type(transport).__name__}(...), "
            "not beside it"
        )
    if event_storage is not None:
        if isinstance(transport, Sqlite):
            raise ConfigurationError("give store= or event_storage=, not both")
        if not isinstance(transport, Memory):
            raise ConfigurationError(
                f"a {transport.kind} transport cannot be combined with event_storage="
            )
    return transport
