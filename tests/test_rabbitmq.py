"""The bus over RabbitMQ (issue 15): publishing under confirms, a queue per group bound with
the subscriptions' patterns, several processes, a consumer killed mid-stream, dead letters,
partitions, bad URLs and credentials, a broker restart.

Most tests talk to the RabbitMQ on 127.0.0.1:5672 (guest/guest). When it is unreachable they
are skipped with the reason printed, except under ``OXBUS_CI=1`` where they fail. Every test
uses its own exchange (a uuid; queues are named after it) and deletes what it declared; the
shared broker is never stopped. The restart test starts a private RabbitMQ node on free ports.

The broker is inspected with aio-pika, an independent client. Other processes report each
handled event on stdout, so the tests wait on those reports, never with sleeps; the few
deliberate waits are marked ``# sleep-ok``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import oxbus
import pytest
from _brokers import (
    ConsumerProcess,
    Tally,
    counted,
    failing,
    free_port,
    health_until,
    reap_consumers,  # noqa: F401 - an autouse fixture
    started,
)
from _env import unavailable
from oxbus import DomainEvent, EventBus, TransportError
from oxbus.errors import ConfigurationError

HOST, PORT = "127.0.0.1", 5672
URL = f"amqp://guest:guest@{HOST}:{PORT}/%2f"

aio_pika = pytest.importorskip("aio_pika", reason="aio-pika (a test dependency) is missing")


# --------------------------------------------------------------------------- helpers


def _reachable(host: str = HOST, port: int = PORT) -> str | None:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return None
    except OSError as e:
        return f"RabbitMQ at {host}:{port} is unreachable ({e})"


@pytest.fixture(scope="module")
def rabbit_up() -> None:
    reason = _reachable()
    if reason is not None:
        unavailable(reason)


class Broker:
    """aio-pika on the shared broker: inspects queues; deletes this test's names at the end."""

    def __init__(self, conn: Any, exchange: str) -> None:
        self.conn = conn
        self.exchange = exchange
        self.groups: set[str] = set()

    def group(self, name: str) -> dict[str, Any]:
        """The bus keywords of a group on this test's exchange (remembered for clean-up)."""
        self.groups.add(name)
        return {"group": name, "exchange": self.exchange}

    def queue(self, group: str) -> str:
        return f"{self.exchange}.{group}"

    async def depth(self, queue: str) -> int:
        """Messages ready in ``queue``."""
        ch = await self.conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
            return int(q.declaration_result.message_count)
        finally:
            await ch.close()

    async def take(self, queue: str) -> list[Any]:
        """Every message ready in ``queue`` (acknowledged: they leave it)."""
        return await self._get_all(queue, no_ack=True)

    async def peek(self, queue: str) -> list[Any]:
        """Every message ready in ``queue``, left there (unacknowledged, then requeued)."""
        return await self._get_all(queue, no_ack=False)

    async def _get_all(self, queue: str, no_ack: bool) -> list[Any]:
        ch = await self.conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
            got = []
            while (m := await q.get(no_ack=no_ack, fail=False)) is not None:
                got.append(m)
            return got
        finally:
            await ch.close()

    async def publish_raw(self, body: bytes, routing_key: str, **props: Any) -> None:
        """A message from another system, straight to the exchange."""
        ch = await self.conn.channel()
        try:
            ex = await ch.get_exchange(self.exchange, ensure=False)
            await ex.publish(aio_pika.Message(body, **props), routing_key=routing_key)
        finally:
            await ch.close()

    async def clean(self) -> None:
        ch = await self.conn.channel()
        for g in self.groups:
            q = self.queue(g)
            for name in [q, f"{q}.dead", *(f"{q}.{i}" for i in range(8))]:
                await ch.queue_delete(name)
            await ch.exchange_delete(f"{q}.hash")
        await ch.exchange_delete(self.exchange)
        await ch.close()


@pytest.fixture
async def amqp(rabbit_up: None) -> Any:
    conn = await aio_pika.connect(URL)
    broker = Broker(conn, f"oxbus-test.{uuid.uuid4().hex[:12]}")
    yield broker
    await broker.clean()
    await conn.close()


@pytest.fixture
async def hash_exchange(amqp: Broker) -> None:
    """partitions= needs the consistent-hash exchange plugin (``.ci/run`` enables it)."""
    ch = await amqp.conn.channel()
    name = f"{amqp.exchange}.probe"
    try:
        await ch.declare_exchange(name, "x-consistent-hash", auto_delete=True)
        await ch.exchange_delete(name)
        await ch.close()
    except aio_pika.exceptions.AMQPError as e:
        unavailable(
            f"the consistent-hash exchange is not enabled ({e}): "
            "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"
        )


# A consumer process: reports "ready" once its queue is bound, then "h <n>" per handled event
# (and appends "<key> <n>" to its own file), and on stdin EOF drains, stops and reports "bye".
CONSUMER = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from oxbus import DomainEvent, EventBus

    class AmqpTick(DomainEvent):
        def __init__(self, n, k="", **kw):
            super().__init__(**kw)
            self.n, self.k = n, k

        @property
        def aggregate_id(self):
            return self.k or None

    async def main():
        cfg = json.loads(sys.argv[1])
        bus = EventBus(
            transport=cfg["url"], group=cfg["group"], exchange=cfg["exchange"],
            max_deliveries=cfg.get("max_deliveries", 5), prefetch=cfg.get("prefetch", 1000),
            partitions=cfg.get("partitions", 1),
        )
        out = open(cfg["out"], "a", buffering=1)
        delay, crash = cfg.get("delay", 0.0), cfg.get("crash", False)

        async def handle(event):
            if crash:
                os.kill(os.getpid(), signal.SIGKILL)
            if delay:
                await asyncio.sleep(delay)  # sleep-ok: the handler's simulated work
            out.write(f"{event.k} {event.n}\\n")
            sys.stdout.write(f"h {event.n}\\n")
            sys.stdout.flush()

        bus.subscribe(AmqpTick, handle)
        await bus.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await bus.drain(30)
        t = bus.get_health_status()["transport"]
        await bus.stop(timeout=10)
        out.close()
        keep = ("received", "claimed", "dead_lettered")
        print("bye " + json.dumps({k: t[k] for k in keep}), flush=True)

    asyncio.run(main())
    """
)


class Consumer(ConsumerProcess):
    """A consumer subprocess running CONSUMER, its handled numbers fed to a Tally."""

    script = CONSUMER

    @classmethod
    async def start(cls, tmp: Path, tally: Tally, name: str, **cfg: Any) -> Consumer:
        cfg.setdefault("url", URL)
        return await cls.launch(tmp, tally, name, cfg)

    def handled(self) -> list[tuple[str, int]]:
        if not self.out.exists():
            return []
        return [(k, int(n)) for k, n in (ln.split(" ") for ln in self.out.read_text().splitlines())]

    def numbers(self) -> list[int]:
        return [n for _, n in self.handled()]


class AmqpTick(DomainEvent):
    """The event consumer processes handle (same class name there)."""

    def __init__(self, n: int, k: str = "", **kw: Any) -> None:
        super().__init__(**kw)
        self.n, self.k = n, k

    @property
    def aggregate_id(self) -> str | None:
        return self.k or None


class AmqpPaid(DomainEvent):
    event_type = "billing.paid"

    def __init__(self, order_id: str, amount: float, **kw: Any) -> None:
        super().__init__(**kw)
        self.order_id, self.amount = order_id, amount

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class Changes:
    """Handlers call ``note()`` after they recorded something; ``until(pred)`` waits (no
    sleep) until ``pred()`` holds."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    def note(self) -> None:
        self._changed.set()

    async def until(self, pred: Callable[[], bool], timeout: float = 20) -> None:
        async def watch() -> None:
            while not pred():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)


# ------------------------------------------------------------------ one process, one group


async def test_published_events_are_handled_once_and_acknowledged(amqp: Broker) -> None:
    bus = EventBus(transport=URL, **amqp.group("billing"))
    seen, done, handle = counted(500)
    bus.subscribe(AmqpTick, handle)
    await bus.start()
    try:
        for i in range(100):
            await bus.publish(AmqpTick(i))
        await bus.publish_many(AmqpTick(i) for i in range(100, 500))
        await asyncio.wait_for(done.wait(), 30)
        await bus.drain(10)
        assert sorted(e.n for e in seen) == list(range(500))
        t = bus.get_health_status()["transport"]
        # lag and pending are readings (queue depth every 2 s; unsettled deliveries).
        assert isinstance(t.pop("lag"), int) and isinstance(t.pop("pending"), int)
        assert t.pop("partitions")["count"] == 1
        assert t == {
            "kind": "rabbitmq",
            "reachable": True,
            "published": 500,
            "received": 500,
            "claimed": 0,
            "dead_lettered": 0,
            "last_error": None,
        }
    finally:
        await bus.stop(timeout=10)
    assert len(seen) == 500  # nothing more arrived while stopping
    # Every message was acknowledged: nothing is left in the group's queue.
    assert await amqp.depth(amqp.queue("billing")) == 0


async def test_a_rabbitmq_options_object_is_the_url_with_its_keywords(amqp: Broker) -> None:
    options = oxbus.RabbitMQ(URL, group="opts", exchange=amqp.exchange, prefetch=10)
    amqp.groups.add("opts")
    assert (
        EventBus(transport=URL, group="opts", exchange=amqp.exchange, prefetch=10).transport
        == options
    )
    assert "guest:***@" in repr(options) and "guest:guest" not in repr(options)
    bus = EventBus(transport=options)
    seen, done, handle = counted(20)
    bus.subscribe(AmqpTick, handle)
    async with bus:
        await bus.publish_many(AmqpTick(i) for i in range(20))
        await asyncio.wait_for(done.wait(), 20)
    assert sorted(e.n for e in seen) == list(range(20))
    with pytest.raises(ConfigurationError, match="stream"):
        EventBus(transport=URL, stream="s")  # a Redis setting
    with pytest.raises(ConfigurationError, match="exchange"):
        EventBus(transport=options, exchange="x")  # belongs inside the options


async def test_publish_returns_once_the_broker_holds_the_message(amqp: Broker) -> None:
    # The group's queue exists (a consumer bus declared it); a publish-only bus publishes.
    consumer = EventBus(transport=URL, **amqp.group("billing"))
    consumer.subscribe(AmqpPaid, lambda e: None)
    await consumer.start()
    await consumer.stop()  # declared and bound, then gone: messages wait in the queue
    pub = await started(transport=URL, **amqp.group("publisher"))
    try:
        sent = AmqpPaid("o-1", 9.5)
        assert await pub.publish(sent, correlation_id="corr-1") is True
        # Confirmed: already in the queue, with its identity in the message properties.
        (m,) = await amqp.take(amqp.queue("billing"))
        assert m.routing_key == "billing.paid" and m.exchange == amqp.exchange
        assert m.message_id == sent.event_id and m.correlation_id == "corr-1"
        assert m.type == "billing.paid" and m.content_type == "application/json"
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert m.headers["key"] == "o-1"
        body = json.loads(m.body)
        assert body["data"] == {"order_id": "o-1", "amount": 9.5}
        assert body["event_id"] == sent.event_id
        await pub.publish_many(AmqpPaid(f"o-{i}", 1.0) for i in range(50))
        assert await amqp.depth(amqp.queue("billing")) == 50  # one wait, all confirmed
    finally:
        await pub.stop(timeout=10)


async def test_two_groups_each_get_every_event(amqp: Broker) -> None:
    a_seen, a_done, a = counted(100)
    b_seen, b_done, b = counted(100)
    bus_a = EventBus(transport=URL, **amqp.group("billing"))
    bus_a.subscribe(AmqpTick, a)
    bus_b = EventBus(transport=URL, **amqp.group("shipping"))
    bus_b.subscribe(AmqpTick, b)
    async with bus_a, bus_b:
        await bus_a.publish_many(AmqpTick(i) for i in range(100))
        await asyncio.wait_for(asyncio.gather(a_done.wait(), b_done.wait()), 20)
    assert sorted(e.n for e in a_seen) == list(range(100))
    assert sorted(e.n for e in b_seen) == list(range(100))


async def test_a_group_receives_only_what_its_topic_patterns_match(amqp: Broker) -> None:
    got: list[str] = []
    done = asyncio.Event()

    async def record(e: Any) -> None:
        got.append(e["event_type"])
        if e["event_type"] == "rmq.last":
            done.set()

    bus = EventBus(transport=URL, **amqp.group("topics"))
    bus.subscribe("rmq.order.*", record)  # one word
    bus.subscribe("rmq.invoice.#", record)  # zero or more
    bus.subscribe("rmq.last", record)
    async with bus:
        # Type keys of their own: another test module registers a class as "order.placed".
        for t in [
            "rmq.order.placed",
            "rmq.order.eu.placed",
            "rmq.invoice",
            "rmq.invoice.sent.late",
            "rmq.shipment.sent",
            "rmq.last",
        ]:
            await bus.publish({"event_type": t})
        await asyncio.wait_for(done.wait(), 20)
        await bus.drain()
        received = bus.get_health_status()["transport"]["received"]
    assert sorted(got) == ["rmq.invoice", "rmq.invoice.sent.late", "rmq.last", "rmq.order.placed"]
    # The broker filtered: what no pattern matches never reached this process.
    assert received == 4


async def test_a_subscription_made_while_the_bus_runs_gets_what_other_buses_publish(
    amqp: Broker,
) -> None:
    got: list[str] = []
    paid: list[AmqpPaid] = []
    changes = Changes()

    async def record(e: Any) -> None:
        got.append(e["event_type"])
        changes.note()

    async def pay(e: AmqpPaid) -> None:
        paid.append(e)
        changes.note()

    bus = EventBus(transport=URL, **amqp.group("late"))
    bus.subscribe("rmq.first", record)
    publisher = EventBus(transport=URL, consume=False, **amqp.group("publisher"))
    async with bus, publisher:
        # Bound by subscribe(): what this bus publishes afterwards is routed by it already.
        bus.subscribe("rmq.own.*", record)
        await bus.publish({"event_type": "rmq.own.x"})
        # Another bus (another process, as far as the broker knows) once ready() returned.
        bus.subscribe("rmq.late.#", record)
        second = bus.subscribe("rmq.late.#", record)  # the same pattern twice
        bus.subscribe(AmqpPaid, pay)  # a class: its type key, "billing.paid"
        await bus.ready()
        assert bus.unsubscribe(second)  # the other still needs the binding: it stays
        for t in ["rmq.late", "rmq.late.a.b", "rmq.first", "rmq.unbound"]:
            await publisher.publish({"event_type": t})
        await publisher.publish(AmqpPaid("o-1", 3.0))
        await publisher.publish({"event_type": "rmq.last"})
        await changes.until(lambda: len(got) == 4 and len(paid) == 1)
        # A pattern RabbitMQ cannot bind is refused by subscribe(), and not kept.
        with pytest.raises(ConfigurationError, match="255 bytes"):
            bus.subscribe("r" * 300, record)
        assert len(bus.subscriptions()) == 4
        await bus.drain()
        received = bus.get_health_status()["transport"]["received"]
    assert sorted(got) == ["rmq.first", "rmq.late", "rmq.late.a.b", "rmq.own.x"]
    assert [p.order_id for p in paid] == ["o-1"]
    assert received == 5  # neither rmq.unbound nor rmq.last reached this group
    # The bindings are the durable queue's (added, never removed): a later member of the
    # group that does not subscribe to rmq.late.# still receives (and acknowledges) it.
    again = EventBus(transport=URL, **amqp.group("late"))
    again.subscribe("rmq.first", record)
    async with again, publisher:
        await publisher.publish({"event_type": "rmq.late.again"})
        await publisher.publish({"event_type": "rmq.first"})  # queued behind it
        await changes.until(lambda: got.count("rmq.first") == 2)
        await again.drain()
        assert again.get_health_status()["transport"]["received"] == 2
    assert "rmq.late.again" not in got
    assert await amqp.depth(amqp.queue("late")) == 0


async def test_with_partitions_a_subscription_made_while_running_binds_every_partition(
    amqp: Broker, hash_exchange: None
) -> None:
    keys, per_key = ["k-a", "k-b", "k-c", "k-d"], 25
    order: dict[str, list[int]] = {k: [] for k in keys}
    changes = Changes()

    async def handle(e: AmqpTick) -> None:
        order[e.k].append(e.n)
        changes.note()

    bus = EventBus(transport=URL, partitions=3, workers=4, **amqp.group("g"))
    bus.subscribe("rmq.nothing", handle)
    publisher = EventBus(transport=URL, consume=False, **amqp.group("publisher"))
    async with bus, publisher:
        bus.subscribe(AmqpTick, handle)
        await bus.ready()
        await publisher.publish_many(AmqpTick(i, k) for i in range(per_key) for k in keys)
        await changes.until(lambda: sum(map(len, order.values())) == len(keys) * per_key)
        await bus.drain()
    for k in keys:
        assert order[k] == list(range(per_key)), f"{k} handled out of order"
    # Through the consistent-hash exchange: spread over the partition queues, all taken.
    assert [await amqp.depth(f"{amqp.queue('g')}.{i}") for i in range(3)] == [0, 0, 0]


async def test_a_running_bus_that_did_not_join_its_group_refuses_a_subscription(
    amqp: Broker,
) -> None:
    got: list[str] = []
    changes = Changes()

    def record(e: Any) -> None:
        got.append(e["event_type"])
        changes.note()

    publisher = EventBus(transport=URL, consume=False, **amqp.group("publisher"))
    # No subscription at start (consume=None): the bus publishes only, joins no group.
    idle = EventBus(transport=URL, **amqp.group("idle"))
    # consume=True: the group's queue is declared with no binding yet, and read.
    joined = EventBus(transport=URL, consume=True, **amqp.group("joined"))
    async with publisher, idle, joined:
        with pytest.raises(oxbus.errors.NotConsuming, match="consume=True") as e:
            idle.subscribe("rmq.x", record)
        assert isinstance(e.value, ConfigurationError)
        assert "'idle'" in str(e.value) and "before start()" in str(e.value)
        assert idle.subscriptions() == []
        joined.subscribe("rmq.x", record)
        await joined.ready()
        await publisher.publish({"event_type": "rmq.x"})
        await changes.until(lambda: got == ["rmq.x"])
    # consume=False is the user's choice: accepted (with a warning), nothing is read.
    silent = EventBus(transport=URL, consume=False, **amqp.group("silent"))
    async with silent:
        silent.subscribe("rmq.x", record)
        await silent.ready()
        assert silent.get_health_status()["transport"]["partitions"]["owned"] == []


async def test_events_come_back_as_the_users_class_with_identity_and_correlation(
    amqp: Broker,
) -> None:
    seen: list[AmqpPaid] = []
    envelopes: list[Any] = []
    done = asyncio.Event()

    async def handle(e: AmqpPaid) -> None:
        seen.append(e)
        envelopes.append(oxbus.current_envelope())
        done.set()

    bus = EventBus(transport=URL, **amqp.group("g"))
    bus.subscribe(AmqpPaid, handle)
    async with bus:
        sent = AmqpPaid("o-7", 12.5)
        await bus.publish(sent, correlation_id="c-7")
        await asyncio.wait_for(done.wait(), 20)
    (e,) = seen
    assert type(e) is AmqpPaid and e is not sent
    assert (e.order_id, e.amount, e.event_id) == ("o-7", 12.5, sent.event_id)
    assert e.correlation_id == "c-7" and envelopes[0].correlation_id == "c-7"


async def test_a_message_the_bus_cannot_take_goes_to_the_dead_queue_and_the_rest_is_handled(
    amqp: Broker,
) -> None:
    def body(n: int, key: Any) -> bytes:
        return json.dumps(
            {
                "event_id": str(uuid.uuid4()),
                "event_type": "amqp.foreign",
                "event_version": 1,
                "occurred_at": "2026-12-05T08:00:00+00:00",
                "data": {"event_type": "amqp.foreign", "aggregate_id": key, "n": n},
                "metadata": {},
            }
        ).encode()

    bus = EventBus(transport=URL, workers=2, **amqp.group("foreign"))
    seen, done, handle = counted(4)
    bus.subscribe("amqp.foreign", handle)
    await bus.start()
    try:
        for n, key in enumerate(["a", {"not": "hashable"}, "b", "c"]):
            await amqp.publish_raw(body(n, key), "amqp.foreign")
        await amqp.publish_raw(b"{not json", "amqp.foreign")
        await amqp.publish_raw(body(4, "d"), "amqp.foreign")
        await asyncio.wait_for(done.wait(), 20)
        await bus.drain()
    finally:
        await bus.stop(timeout=10)
    assert sorted(e["n"] for e in seen) == [0, 2, 3, 4]
    dead = await amqp.take(f"{amqp.queue('foreign')}.dead")
    assert len(dead) == 2
    errors = sorted(str(m.headers["error"]) for m in dead)
    assert "InvalidEvent" in errors[0] and "unhashable" in errors[0], errors
    assert {m.headers["group"] for m in dead} == {"foreign"}
    assert b"{not json" in {m.body for m in dead}
    assert await amqp.depth(amqp.queue("foreign")) == 0, "a message is still in the queue"


async def test_health_reports_the_depth_of_the_queue_and_unsettled_deliveries(
    amqp: Broker,
) -> None:
    bus = EventBus(transport=URL, prefetch=10, **amqp.group("g"))
    gate = asyncio.Event()
    _seen, done, record = counted(50)

    async def slow(e: Any) -> None:
        await gate.wait()
        await record(e)

    bus.subscribe(AmqpTick, slow)
    await bus.start()
    try:
        await bus.publish_many(AmqpTick(i) for i in range(50))
        # The depth is read every ~2 s in the background.
        t = await health_until(bus, lambda t: t["pending"] == 10 and t["lag"] == 40, 200)
        assert t["reachable"] is True
        gate.set()
        await asyncio.wait_for(done.wait(), 20)
        await health_until(bus, lambda t: t["pending"] == 0 and t["lag"] == 0, 200)
    finally:
        gate.set()
        await bus.stop(timeout=10)


async def test_with_partitions_each_keys_events_are_handled_in_publish_order(
    amqp: Broker, hash_exchange: None
) -> None:
    keys, per_key = ["acct-a", "acct-b", "acct-c", "acct-d"], 100
    bus = EventBus(transport=URL, partitions=4, workers=4, **amqp.group("g"))
    order: dict[str, list[int]] = {k: [] for k in keys}
    done = asyncio.Event()

    async def handle(e: AmqpTick) -> None:
        for _ in range(e.n % 3):  # interleave handlers of different keys
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        order[e.k].append(e.n)
        if sum(map(len, order.values())) == len(keys) * per_key:
            done.set()

    bus.subscribe(AmqpTick, handle)
    await bus.start()
    try:
        await bus.publish_many(AmqpTick(i, k) for i in range(per_key) for k in keys)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await bus.stop(timeout=10)
    for k in keys:
        assert order[k] == list(range(per_key)), f"{k} handled out of order"
    depths = [await amqp.depth(f"{amqp.queue('g')}.{i}") for i in range(4)]
    assert depths == [0, 0, 0, 0]


# ------------------------------------------------------------------------ several processes


async def test_two_consumer_processes_in_one_group_share_the_events_none_lost_none_twice(
    tmp_path: Path, amqp: Broker
) -> None:
    tally = Tally()
    cfg = amqp.group("billing")
    c1 = await Consumer.start(tmp_path, tally, "c1", prefetch=50, **cfg)
    c2 = await Consumer.start(tmp_path, tally, "c2", prefetch=50, **cfg)
    pub = await started(transport=URL, **amqp.group("publisher"))
    n = 3000
    try:
        for start in range(0, n, 500):
            await pub.publish_many(AmqpTick(i) for i in range(start, start + 500))
        await tally.until(lambda t: len(t.seen) == n, 60, "every event handled")
    finally:
        await pub.stop(timeout=10)
    await c1.stop()
    await c2.stop()
    f1, f2 = c1.numbers(), c2.numbers()
    assert len(f1) == len(set(f1)), "c1 handled an event twice"
    assert len(f2) == len(set(f2)), "c2 handled an event twice"
    assert not set(f1) & set(f2), f"{len(set(f1) & set(f2))} events handled by both"
    assert set(f1) | set(f2) == set(range(n)), "events lost"
    assert f1 and f2, f"the group did not share the work: c1 {len(f1)}, c2 {len(f2)}"
    assert await amqp.depth(amqp.queue("billing")) == 0


async def test_messages_of_a_consumer_killed_mid_run_are_redelivered_to_another(
    tmp_path: Path, amqp: Broker
) -> None:
    tally = Tally()
    n = 300
    cfg = amqp.group("billing")
    # Slow, with a large prefetch: it holds many messages, delivered and unacknowledged.
    victim = await Consumer.start(tmp_path, tally, "victim", delay=0.01, **cfg)
    pub = await started(transport=URL, **amqp.group("publisher"))
    try:
        await pub.publish_many(AmqpTick(i) for i in range(n))
    finally:
        await pub.stop(timeout=10)
    await tally.until(lambda t: t.calls >= 20, 30, "the victim to handle 20 events")
    survivor = await Consumer.start(tmp_path, tally, "survivor", **cfg)
    await victim.kill()
    killed_after = len(victim.numbers())
    assert killed_after < n, "the victim finished before it was killed"
    await tally.until(lambda t: len(t.seen) == n, 60, "the survivor to finish the rest")
    await survivor.stop()
    handled = victim.numbers() + survivor.numbers()
    assert not set(range(n)) - set(handled), "events lost"
    assert survivor.bye is not None and survivor.bye["claimed"] >= n - killed_after - 1
    assert await amqp.depth(amqp.queue("billing")) == 0


async def test_per_key_order_holds_across_processes_when_the_active_consumer_is_killed(
    tmp_path: Path, amqp: Broker, hash_exchange: None
) -> None:
    tally = Tally()
    keys, per_key = ["k1", "k2", "k3"], 60
    cfg = {**amqp.group("ordered"), "partitions": 2}
    first = await Consumer.start(tmp_path, tally, "first", delay=0.01, **cfg)
    second = await Consumer.start(tmp_path, tally, "second", **cfg)  # waits: single active
    pub = await started(transport=URL, **amqp.group("publisher"))
    # Numbers grow along each key: n = i * 3 + j for the i-th event of key j.
    expected = {k: [i * len(keys) + j for i in range(per_key)] for j, k in enumerate(keys)}
    try:
        await pub.publish_many(
            AmqpTick(i * len(keys) + j, k) for i in range(per_key) for j, k in enumerate(keys)
        )
    finally:
        await pub.stop(timeout=10)
    await tally.until(lambda t: t.calls >= 15, 30, "the first consumer to handle 15 events")
    await first.kill()
    total = len(keys) * per_key
    await tally.until(lambda t: len(t.seen) == total, 60, "the second to finish the rest")
    await second.stop()
    assert first.numbers(), "the first consumer handled nothing before it was killed"
    for k in keys:
        one = [n for key, n in first.handled() if key == k]
        two = [n for key, n in second.handled() if key == k]
        assert one == expected[k][: len(one)], f"{k}: the first handled out of order: {one}"
        assert two == sorted(set(two)), f"{k}: the second handled out of order: {two}"
        assert sorted(set(one) | set(two)) == expected[k], f"{k}: events lost"
        if one and two:  # the second resumed where the first stopped (in-flight ones again)
            assert two[0] <= one[-1] + len(keys), f"{k}: a gap {one[-1]} -> {two[0]}"


async def test_a_message_delivered_max_deliveries_times_goes_to_the_dead_queue(
    tmp_path: Path, amqp: Broker
) -> None:
    tally = Tally()
    cfg = {**amqp.group("billing"), "max_deliveries": 2}
    first = await Consumer.start(tmp_path, tally, "crash1", crash=True, **cfg)
    pub = await started(transport=URL, **amqp.group("publisher"))
    try:
        sent = AmqpTick(7)
        await pub.publish(sent)
        await asyncio.wait_for(first.proc.wait(), 20)  # delivery 1: it killed itself
        second = await Consumer.start(tmp_path, tally, "crash2", crash=True, **cfg)
        await asyncio.wait_for(second.proc.wait(), 20)  # delivery 2: killed itself
        third = await Consumer.start(tmp_path, tally, "healthy", **cfg)
        dead_queue = f"{amqp.queue('billing')}.dead"
        for _ in range(100):  # the broker dead-letters as the second connection closes
            if await amqp.depth(dead_queue):
                break
            await asyncio.sleep(0.05)  # sleep-ok: polling the broker, bounded
        await third.stop()
    finally:
        await pub.stop(timeout=10)
    assert first.proc.returncode == -signal.SIGKILL and second.proc.returncode == -signal.SIGKILL
    assert third.numbers() == [], "a message delivered max_deliveries times was delivered again"
    (m,) = await amqp.take(dead_queue)
    assert json.loads(m.body)["event_id"] == sent.event_id
    (death,) = m.headers["x-death"]
    assert death["reason"] == "delivery_limit" and death["queue"] == amqp.queue("billing")
    assert await amqp.depth(amqp.queue("billing")) == 0


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:5672/", "127.0.0.1:5672", "amqp://guest:s3cret@127.0.0.1:port/%2f"],
)
async def test_an_invalid_url_raises_configuration_error(url: str) -> None:
    bus = None
    try:
        with pytest.raises(ConfigurationError) as info:
            bus = EventBus(transport=url, group="g", exchange="oxbus-test.never")
            await asyncio.wait_for(bus.start(), 5)
    finally:
        if bus is not None:
            await bus.stop()
    assert "s3cret" not in str(info.value), "the password leaked into the message"


@pytest.mark.parametrize(
    "setting",
    [
        {"partitions": 0},
        {"prefetch": 0},
        {"prefetch": 70000},
        {"max_deliveries": 0},
        {"connect_timeout": 0},
        {"publish_timeout": -1},
        {"group": ""},
        {"exchange": ""},
    ],
    ids=lambda s: "-".join(f"{k}={v!r}" for k, v in s.items()),
)
def test_an_out_of_range_setting_raises_configuration_error_naming_it(
    setting: dict[str, Any],
) -> None:
    with pytest.raises(ConfigurationError) as info:
        EventBus(transport=URL, **setting)
    (name,) = setting
    assert name in str(info.value)


async def test_a_refused_connection_raises_transport_error_naming_the_host_not_the_password() -> (
    None
):
    port = free_port()
    bus = EventBus(transport=f"amqp://guest:s3cret@{HOST}:{port}/%2f", group="g")
    bus.subscribe(AmqpTick, lambda e: None)
    with pytest.raises(TransportError) as info:
        await asyncio.wait_for(bus.start(), 20)  # a hang guard, not a limit
    text = str(info.value)
    assert f"{HOST}:{port}" in text and "s3cret" not in text, text
    assert not bus.is_running
    with pytest.raises((oxbus.BusClosed, oxbus.BusNotStarted)):
        await bus.publish(AmqpTick(1))


async def test_wrong_credentials_raise_transport_error_within_connect_timeout(
    rabbit_up: None,
) -> None:
    bus = EventBus(
        transport=f"amqp://guest:wr0ng-s3cret@{HOST}:{PORT}/%2f",
        group="g",
        exchange="oxbus-test.never",
        connect_timeout=3.0,
    )
    with pytest.raises(TransportError) as info:
        await asyncio.wait_for(bus.start(), 20)  # a hang guard, not a limit
    text = str(info.value)
    assert HOST in text and "wr0ng-s3cret" not in text, text
    assert "ACCESS_REFUSED" in text or "auth" in text.lower(), text


async def test_a_host_that_never_answers_fails_after_connect_timeout(rabbit_up: None) -> None:
    # A listening socket that never speaks AMQP: the handshake waits; connect_timeout ends it.
    srv = socket.socket()
    srv.bind((HOST, 0))
    srv.listen(8)
    port = srv.getsockname()[1]
    try:
        bus = EventBus(transport=f"amqp://{HOST}:{port}/%2f", group="g", connect_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(bus.start(), 20)  # a hang guard, not a limit
        assert time.monotonic() - t0 >= 0.45  # lower bound only: it waited for the timeout
        assert "connect_timeout" in str(info.value) and str(port) in str(info.value)
    finally:
        srv.close()


# ------------------------------------------------------------------------- broker restart


class PrivateRabbit:
    """A RabbitMQ node of this test only, on free ports, in a temporary directory."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.dist = free_port()
        self.url = f"amqp://guest:guest@{HOST}:{self.port}/%2f"
        self.name = f"oxbus{uuid.uuid4().hex[:8]}@localhost"
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = {HOST}:{self.port}\n")
        (base / "enabled_plugins").write_text("[].\n")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_NODE_IP_ADDRESS": HOST,
            "RABBITMQ_DIST_PORT": str(self.dist),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "HOME": str(self.base),
        }
        self.proc = await asyncio.create_subprocess_exec(
            _SERVER,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(600):  # up to 60 s: a first boot creates its database
            if _reachable(HOST, self.port) is None:
                return
            if self.proc.returncode is not None:
                break
            await asyncio.sleep(0.1)  # sleep-ok: waiting for a server process to listen
        raise AssertionError(f"the private RabbitMQ node did not start (rc {self.proc.returncode})")

    async def stop(self) -> None:
        """Stops the node as a service stop does (SIGTERM: a clean shutdown), SIGKILL after
        30 s."""
        if self.proc is not None:
            if self.proc.returncode is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), 30)
                except asyncio.TimeoutError:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
            self.proc = None


_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@pytest.fixture
async def private_rabbit(rabbit_up: None) -> Any:
    if not os.path.exists(_SERVER) or shutil.which("erl") is None:
        unavailable(f"{_SERVER} is not installed: no private RabbitMQ node to restart")
    with tempfile.TemporaryDirectory(prefix="oxbus-rmq-") as d:
        node = PrivateRabbit(Path(d))
        await node.start()
        yield node
        await node.stop()


@pytest.mark.timeout(300)
async def test_after_a_broker_restart_the_bus_reconnects_and_no_confirmed_event_is_lost(
    private_rabbit: PrivateRabbit,
) -> None:
    tally = Tally()
    gate = asyncio.Event()

    async def handle(e: AmqpTick) -> None:
        if e.n < 20:
            await gate.wait()  # the first 20 stay unacknowledged when the broker dies
        tally.add(e.n)

    bus = EventBus(transport=private_rabbit.url, group="g", publish_timeout=0.5, prefetch=5)
    bus.subscribe(AmqpTick, handle)
    await bus.start()
    try:
        await bus.publish_many(AmqpTick(i) for i in range(20))  # confirmed: on disk
        await private_rabbit.stop()
        with pytest.raises(TransportError) as info:
            await asyncio.wait_for(bus.publish(AmqpTick(99)), 20)  # a hang guard
        assert str(private_rabbit.port) in str(info.value)
        health = bus.get_health_status()
        assert health["transport"]["reachable"] is False and health["status"] == "degraded"
        gate.set()  # handled, but their acknowledgements can no longer reach the broker
        await private_rabbit.start()
        # Back: the bus reconnected and redeclared; new events are confirmed and handled.
        for n in range(100, 200):
            try:
                await bus.publish(AmqpTick(n))
                break
            except TransportError:
                await asyncio.sleep(0.1)  # sleep-ok: the publisher reconnecting, bounded
        await tally.until(
            lambda t: set(range(20)) <= t.seen and any(n >= 100 for n in t.seen),
            60,
            "the 20 confirmed before the restart, redelivered, and one published after",
        )
        assert 99 not in tally.seen
        assert bus.get_health_status()["transport"]["reachable"] is True
    finally:
        gate.set()
        await asyncio.wait_for(bus.stop(timeout=5), 30)


# ------------------------------------------------------------------------------ the bridge


async def test_the_bridge_maps_plain_json_queues_in_and_events_out_with_an_independent_client(
    amqp: Broker,
) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class ChangeBatchQuantity:
        ref: str
        qty: int

    @dataclass(frozen=True)
    class Allocated:
        orderid: str
        sku: str

    inbound, outbound, out_exchange = f"{amqp.exchange}.in", f"{amqp.exchange}.out", amqp.exchange
    ch = await amqp.conn.channel()
    await ch.declare_queue(inbound, durable=True)
    ex = await ch.declare_exchange(out_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    out_q = await ch.declare_queue(outbound, durable=True)
    await out_q.bind(ex, routing_key="line.#")
    try:
        bus = EventBus()
        seen, done, handle = counted(2)
        bus.subscribe(ChangeBatchQuantity, handle)
        bridge = oxbus.AmqpBridge(bus, URL)
        bridge.subscribe_queue(inbound, to=ChangeBatchQuantity)
        bridge.publish_to(out_exchange, "line.allocated", Allocated)
        assert "guest:***@" in repr(bridge)
        async with bus, bridge:
            for ref, qty in (("b-1", 10), ("b-2", 20)):
                body = json.dumps({"ref": ref, "qty": qty}).encode()
                await ch.default_exchange.publish(aio_pika.Message(body), routing_key=inbound)
            await ch.default_exchange.publish(aio_pika.Message(b"{broken"), routing_key=inbound)
            await asyncio.wait_for(done.wait(), 20)
            await bus.publish(Allocated("o-1", "LAMP"))
            await bus.drain()  # the forwarding handler returned: the broker confirmed it
        assert [(e.ref, e.qty) for e in seen] == [("b-1", 10), ("b-2", 20)]
        assert all(type(e) is ChangeBatchQuantity for e in seen)
        (m,) = await amqp.take(outbound)
        assert json.loads(m.body) == {"orderid": "o-1", "sku": "LAMP"}
        assert m.routing_key == "line.allocated" and m.content_type == "application/json"
        assert m.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert await amqp.depth(inbound) == 0, "the bridge left messages unacknowledged"
    finally:
        await ch.queue_delete(inbound)
        await ch.queue_delete(outbound)
        await ch.close()


async def test_the_bridge_refuses_a_queue_that_does_not_exist(amqp: Broker) -> None:
    bridge = oxbus.AmqpBridge(EventBus(), URL)
    bridge.subscribe_queue(f"{amqp.exchange}.missing")
    with pytest.raises(TransportError, match="missing"):
        await asyncio.wait_for(bridge.start(), 20)  # a hang guard, not a limit
    with pytest.raises(ConfigurationError, match="amqp://"):
        oxbus.AmqpBridge(EventBus(), "redis://127.0.0.1:6379/0")


# ------------------------------------------------------------------------------ the CLI


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "oxbus", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode()


async def test_oxbus_health_reads_a_group_from_rabbitmq(amqp: Broker) -> None:
    where = ("--group", "billing", "--exchange", amqp.exchange, "--json")
    rc, out = await _cli("health", URL, *where)
    assert rc == 1 and json.loads(out)["status"] == "stopped", out  # no member started yet
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, lambda e: None)
    async with bus:
        rc, out = await _cli("health", URL, *where)
        report = json.loads(out)
        assert rc == 0 and report["status"] == "healthy", out
        assert report["queues"] == [
            {"queue": amqp.queue("billing"), "ready": 0, "consumers": 1}
        ]
        assert "guest:***@" in report["url"] and report["dead_letters"] == 0
    # Stopped: the queue stays, with no consumer; what is published waits there.
    pub = await started(transport=URL, **amqp.group("publisher"))
    await pub.publish_many(AmqpTick(i) for i in range(3))
    await pub.stop()
    rc, out = await _cli("health", URL, *where)
    report = json.loads(out)
    assert rc == 1 and report["status"] == "degraded" and report["lag"] == 3, out
    rc, out = await _cli("health", f"amqp://guest:s3cret@{HOST}:{free_port()}/%2f", *where)
    assert rc == 3 and "s3cret" not in out, out


# ------------------------------------------------------- dead letters of failed handlers


async def test_a_handler_that_gives_up_sends_the_event_to_the_dead_queue_with_its_error(
    amqp: Broker,
) -> None:
    calls, gave_up, flaky = failing("flaky", 2)
    others: list[int] = []
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, flaky, retry_count=1, name="flaky")
    bus.subscribe(AmqpTick, lambda e: others.append(e.n), name="other")
    sent = AmqpTick(1, "k-1")
    async with bus:
        await bus.publish(sent, correlation_id="c-1")
        await asyncio.wait_for(gave_up.wait(), 20)
        await bus.drain()
        (local,) = bus.dead_letters.list()
        assert (local.subscription, local.error_type, local.attempts) == ("flaky", "ValueError", 2)
    # Stopped: the dead letter is on the broker (confirmed before the ack) and the message
    # left the group's queue.
    assert calls == [1, 1] and others == [1]
    (m,) = await amqp.peek(f"{amqp.queue('billing')}.dead")
    h = {k: str(v) for k, v in m.headers.items()}
    assert h["dead_letter_id"] == local.id
    assert (h["subscription"], h["error_type"], h["error_message"], h["attempts"]) == (
        "flaky", "ValueError", "flaky refuses 1", "2",
    )
    assert "Traceback" in h["traceback"] and "ValueError: flaky refuses 1" in h["traceback"]
    assert h["first_failed_at"] <= h["last_failed_at"]
    assert (h["group"], h["queue"]) == ("billing", amqp.queue("billing"))
    body = json.loads(m.body)
    assert body["event_id"] == sent.event_id and body["data"]["n"] == 1
    assert body["metadata"]["correlation_id"] == "c-1"
    assert await amqp.depth(amqp.queue("billing")) == 0


async def test_dead_letters_survive_a_restart_and_a_retry_runs_the_failed_subscription_only(
    amqp: Broker,
) -> None:
    _, gave_up, flaky = failing("flaky", 1)
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, flaky, name="flaky")
    bus.subscribe(AmqpTick, lambda e: None, name="other")
    async with bus:
        await bus.publish(AmqpTick(5, "k-5"))
        await asyncio.wait_for(gave_up.wait(), 20)
        await bus.drain()
    # A new bus of the group lists what the broker holds, from the start.
    fixed, done, handle = counted(1)
    others: list[int] = []
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, handle, name="flaky")
    bus.subscribe(AmqpTick, lambda e: others.append(e.n), name="other")
    async with bus:
        (d,) = bus.dead_letters
        assert (d.subscription, d.error_type, d.error_message) == (
            "flaky", "ValueError", "flaky refuses 5",
        )
        assert type(d.event) is AmqpTick and (d.event.n, d.key) == (5, "k-5")
        assert d.attempts == 1 and "ValueError" in d.traceback
        assert await bus.dead_letters.retry() == 1
        assert len(bus.dead_letters) == 0
        await asyncio.wait_for(done.wait(), 20)
        await bus.drain()
        assert [e.n for e in fixed] == [5] and others == [], "only the failed subscription runs"
        assert await bus.dead_letters.refresh() == 0
    assert await amqp.depth(f"{amqp.queue('billing')}.dead") == 0
    assert await amqp.depth(amqp.queue("billing")) == 0


async def test_clear_empties_the_dead_queue_and_broker_dead_letters_show_their_reason(
    amqp: Broker,
) -> None:
    _, gave_up, flaky = failing("flaky", 2)
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, flaky, name="flaky")
    async with bus:
        await bus.publish_many([AmqpTick(1), AmqpTick(2)])
        await asyncio.wait_for(gave_up.wait(), 20)
        await bus.drain()
    # The broker dead-letters a message itself: another client rejects it.
    await amqp.publish_raw(json.dumps({"event_type": "AmqpTick"}).encode(), "AmqpTick")
    ch = await amqp.conn.channel()
    q = await ch.declare_queue(amqp.queue("billing"), passive=True)
    m = await q.get(no_ack=False)
    await m.reject(requeue=False)
    await ch.close()
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, flaky, name="flaky")
    async with bus:
        for _ in range(100):  # the broker moves the rejected message over
            if await bus.dead_letters.refresh() == 3:
                break
            await asyncio.sleep(0.05)  # sleep-ok: polling the broker, bounded
        by_type = {d.error_type: d for d in bus.dead_letters}
        assert set(by_type) == {"ValueError", "rabbitmq.rejected"}, by_type
        rejected = by_type["rabbitmq.rejected"]
        assert rejected.subscription == "" and "rejected" in rejected.error_message
        assert await bus.dead_letters.clear() == 3
        assert len(bus.dead_letters) == 0
        assert await bus.dead_letters.refresh() == 0
    assert await amqp.depth(f"{amqp.queue('billing')}.dead") == 0


async def test_oxbus_dlq_lists_shows_retries_and_purges_a_groups_dead_letters(
    amqp: Broker,
) -> None:
    _, gave_up, flaky = failing("flaky", 2)
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, flaky, name="flaky")
    async with bus:
        await bus.publish_many([AmqpTick(1), AmqpTick(2)])
        await asyncio.wait_for(gave_up.wait(), 20)
        await bus.drain()
    group = ("--group", "billing", "--exchange", amqp.exchange)
    rc, out = await _cli("dlq", URL, "list", *group, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and len(rows) == 2, out
    assert sorted(r["data"]["n"] for r in rows) == [1, 2]
    for r in rows:
        assert (r["subscription"], r["error_type"], r["event_type"]) == (
            "flaky", "ValueError", "AmqpTick",
        )
        assert r["queue"] == amqp.queue("billing") and "traceback" not in r
    first, second = rows
    rc, out = await _cli("dlq", URL, "show", first["id"], *group, "--json")
    shown = json.loads(out)
    assert rc == 0 and shown["id"] == first["id"] and "ValueError" in shown["traceback"], out
    rc, out = await _cli("dlq", URL, "show", "no-such-id", *group)
    assert rc == 1 and "no-such-id" in out, out
    rc, out = await _cli("dlq", URL, "list", *group)
    assert rc == 0 and "flaky" in out and "ValueError: flaky refuses" in out, out
    # A retry goes back to the group, for the failed subscription: a member handles it.
    fixed, done, handle = counted(1)
    bus = EventBus(transport=URL, **amqp.group("billing"))
    bus.subscribe(AmqpTick, handle, name="flaky")
    async with bus:
        rc, out = await _cli("dlq", URL, "retry", first["id"], *group, "--json")
        assert rc == 0 and json.loads(out) == {"retried": 1, "ids": [first["id"]]}, out
        await asyncio.wait_for(done.wait(), 20)
        await bus.drain()
    assert [e.n for e in fixed] == [first["data"]["n"]]
    rc, out = await _cli("dlq", URL, "retry", "no-such-id", *group, "--json")
    assert rc == 1 and json.loads(out)["error"]["exit_code"] == 1, out
    rc, out = await _cli("dlq", URL, "list", *group, "--json")
    assert [json.loads(line)["id"] for line in out.splitlines()] == [second["id"]], out
    rc, out = await _cli("dlq", URL, "purge", "--yes", *group, "--json")
    assert rc == 0 and json.loads(out) == {"purged": 1}, out
    rc, out = await _cli("dlq", URL, "list", *group)
    assert rc == 0 and "no dead letters" in out, out
    assert await amqp.depth(f"{amqp.queue('billing')}.dead") == 0
    rc, out = await _cli("dlq", f"amqp://guest:s3cret@{HOST}:{free_port()}/%2f", "list")
    assert rc == 3 and "s3cret" not in out, out


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0])
async def test_reading_queues_with_any_timeout_answers_instead_of_panicking(
    rabbit_up: None, timeout: float
) -> None:
    """`oxbus health amqp://` reads queues with the timeout it was given: one that is not a
    number of seconds is bounded like every other timeout of the transport (it was a Rust
    panic on NaN)."""
    from oxbus._oxbus import TransportCore

    name = f"oxbus-test-absent-{uuid.uuid4().hex[:8]}"
    assert await TransportCore.rabbitmq_queues(URL, [name], timeout) == [None]
