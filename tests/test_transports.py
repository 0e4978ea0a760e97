"""``EventBus(transport=...)``: a URL or an options object (``oxbus.Memory``, ``oxbus.Sqlite``,
``oxbus.RedisStreams``), each checked once when it is made; the old keywords (``store=``,
``transport="redis://..."`` with ``group=``, ``stream=``...) stand for the same objects.
The Redis round trip over an options object is in test_redis.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import oxbus
from oxbus import EventBus, InMemoryEventBus, Memory, RedisStreams, Sqlite, SqliteEventStore
from oxbus.errors import ConfigurationError


class Tick(oxbus.DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


def test_the_options_classes_are_public() -> None:
    for name in ("Memory", "Sqlite", "RedisStreams", "Transport"):
        assert name in oxbus.__all__
        assert getattr(oxbus, name).__module__ == "oxbus.transports"


def test_a_bus_without_transport_keeps_its_events_in_memory() -> None:
    assert EventBus().transport == Memory()
    assert EventBus(transport="memory://").transport == Memory()
    assert EventBus(transport=Memory()).transport == Memory()


def test_a_redis_url_with_keywords_is_the_same_as_the_options_object() -> None:
    by_url = EventBus(
        transport="redis://127.0.0.1:6379/0", group="billing", consumer="c-1", stream="orders",
        partitions=4, claim_idle=2.5, maxlen=0, max_deliveries=3, publish_timeout=1,
        prefetch=10, consume=False,
    )
    options = RedisStreams(
        "redis://127.0.0.1:6379/0", group="billing", consumer="c-1", stream="orders",
        partitions=4, claim_idle=2.5, maxlen=0, max_deliveries=3, publish_timeout=1.0,
        prefetch=10, consume=False,
    )
    assert by_url.transport == options
    assert EventBus(transport=options).transport is options


def test_redis_options_have_the_documented_defaults_and_hand_keywords_to_the_engine() -> None:
    options = RedisStreams("redis://h:6379/0", partitions=2, consumer="me")
    assert (options.group, options.stream, options.claim_idle, options.maxlen) == (
        "default", "oxbus:events", 30.0, 1_000_000
    )
    assert (options.max_deliveries, options.publish_timeout, options.prefetch) == (5, 5.0, 1000)
    native = options.native(consume=True)
    assert native["streams"] == ["oxbus:events:0", "oxbus:events:1"]
    assert native["dead_stream"] == "oxbus:events:dead"
    assert native["consumer"] == "me" and native["consume"] is True
    assert RedisStreams("redis://h").native(False)["consumer"].endswith(f"-{os.getpid()}")


def test_store_keyword_is_short_for_sqlite_options(tmp_path: Path) -> None:
    path = str(tmp_path / "events.db")
    bus = EventBus(store=path)
    assert bus.transport == Sqlite(path)
    assert bus._store is not None and bus._store.path == path
    bus._store.close()


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: RedisStreams("redis://h", partitions=0), "partitions must be an int >= 1, got 0"),
        (lambda: RedisStreams("redis://h", maxlen=-1), "maxlen must be an int >= 0"),
        (lambda: RedisStreams("redis://h", claim_idle=0), "claim_idle must be a number of seconds > 0, got 0"),
        (lambda: RedisStreams("redis://h", publish_timeout="5"), "publish_timeout must be a number of seconds > 0, got '5'"),
        (lambda: RedisStreams("redis://h", prefetch=True), "prefetch must be an int >= 1, got True"),
        (lambda: RedisStreams("redis://h", max_deliveries=0), "max_deliveries must be an int >= 1, got 0"),
        (lambda: RedisStreams("redis://h", group=""), "group must be a non-empty str, got ''"),
        (lambda: RedisStreams("redis://h", stream=3), "stream must be a non-empty str, got 3"),
        (lambda: RedisStreams("redis://h", consume="yes"), "consume must be True, False or None, got 'yes'"),
        (lambda: RedisStreams("http://h"), "redis:// (or rediss://, unix://) URL, got 'http://h'"),
        (lambda: Sqlite("x.db", synchronous="sometimes"), "synchronous must be 'normal' or 'full', got 'sometimes'"),
        (lambda: Sqlite(""), "store must be a SqliteEventStore or a file path, got ''"),
        (lambda: Sqlite(42), "store must be a SqliteEventStore or a file path, got 42"),  # type: ignore[arg-type]
        (lambda: EventBus(transport="amqp://guest@h/"), "transport URL must start with one of"),
        (lambda: EventBus(transport=42), "transport must be a URL or transport options"),  # type: ignore[arg-type]
        (lambda: EventBus(transport="redis://h", partitions=0), "partitions must be an int >= 1, got 0"),
        (lambda: EventBus(transport="memory://", group="g"), "group does not apply to a memory transport"),
    ],
)
def test_a_bad_setting_raises_configuration_error_naming_it(make: Any, named: str) -> None:
    with pytest.raises(ConfigurationError) as err:
        make()
    assert named in str(err.value)


def test_keywords_beside_an_options_object_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigurationError, match=r"give group, partitions inside RedisStreams"):
        EventBus(transport=RedisStreams("redis://h"), group="g", partitions=2)
    with pytest.raises(ConfigurationError, match="inside Memory"):
        EventBus(transport=Memory(), stream="s")


def test_transports_that_cannot_be_combined_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "e.db")
    with pytest.raises(ConfigurationError, match="store= or transport="):
        EventBus(store=path, transport="redis://h")
    with pytest.raises(ConfigurationError, match="store= or event_storage="):
        EventBus(transport=Sqlite(path), event_storage=object())
    with pytest.raises(ConfigurationError, match="redis transport cannot be combined"):
        EventBus(transport="redis://h", event_storage=object())
    assert not os.path.exists(path)  # nothing was opened


def test_redis_keywords_without_a_redis_transport_are_ignored_as_before() -> None:
    assert EventBus(group="g", partitions=2).transport == Memory()


def test_a_redis_password_never_appears_in_the_options_repr_or_errors() -> None:
    options = RedisStreams("redis://:s3cret@h:6379/0", group="g")
    assert "s3cret" not in repr(options) and ":***@h" in repr(options)
    assert "s3cret" not in repr(EventBus(transport="redis://user:s3cret@h/0").transport)
    with pytest.raises(ConfigurationError) as err:
        oxbus.Transport.from_url("redis://:s3cret@h/0", gruop="g")
    assert "gruop" in str(err.value) and "s3cret" not in str(err.value)


def test_options_are_frozen() -> None:
    options = RedisStreams("redis://h")
    with pytest.raises(AttributeError):
        options.partitions = 0  # type: ignore[misc]


async def test_a_bus_on_sqlite_options_commits_delivers_and_closes_the_store_it_opened(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "events.db")
    seen: list[int] = []

    async def handle(e: Tick) -> None:
        seen.append(e.n)

    bus = EventBus(transport=Sqlite(path, synchronous="full"))
    bus.subscribe(Tick, handle, name="tr-ticks")
    async with bus:
        await bus.publish(Tick(1))
        assert await bus.publish_many([Tick(2), Tick(3)]) == 2
        await bus.drain()
        store = bus._store
        assert store is not None
        assert await store._core.query("PRAGMA synchronous") == [(2,)]  # FULL
    assert seen == [1, 2, 3]
    assert store.closed
    async with SqliteEventStore(path) as reopened:
        assert [s.event.n for s in await reopened.read_all()] == [1, 2, 3]


async def test_a_bus_on_an_open_store_leaves_it_open(tmp_path: Path) -> None:
    store = SqliteEventStore(str(tmp_path / "events.db"))
    with pytest.raises(ConfigurationError, match="keeps its own setting"):
        Sqlite(store, synchronous="full")
    async with EventBus(transport=Sqlite(store)) as bus:
        await bus.publish(Tick(1))
    assert not store.closed
    store.close()


def test_subclasses_with_their_own_init_take_options_too() -> None:
    class NamedBus(InMemoryEventBus):
        def __init__(self, label: str, **kwargs: Any) -> None:
            super().__init__(transport=Memory(), worker_count=2, **kwargs)
            self.label = label

    bus = NamedBus("x", max_queue_size=5)
    assert (bus.label, bus.transport, bus.get_statistics()["worker_count"]) == ("x", Memory(), 2)
