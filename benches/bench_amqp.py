"""End-to-end events/s over RabbitMQ between two processes (issue 15), beside Redis Streams.

A publisher process sends N events; a consumer process, in one consumer group, handles them.
The clock starts in the publisher just before its first publish and stops in the consumer at
its N-th handled event (both read CLOCK_MONOTONIC, which all processes of a machine share).
Three flows, in the same run, interleaved:

- oxbus-amqp:  ``EventBus(transport=amqp_url, group="bench", exchange=x, prefetch=P)``; the
               publisher calls ``await bus.publish_many(batch)`` over batches of B (each batch
               one confirm wait); the consumer subscribes a sync handler. Events are
               ``DomainEvent`` objects, rebuilt as their class on the consumer.
- aio-pika:    the same flow by hand with aio-pika: a durable topic exchange, the same durable
               quorum queue bound with the same key, publisher confirms (each batch of B
               published concurrently with ``asyncio.gather``, so one wait covers the batch),
               persistent messages with the same JSON body and properties; the consumer sets
               ``basic.qos(P)``, and per message ``json.loads`` -> rebuild the object ->
               handler -> ``await message.ack()`` (manual acks). **The peer of the target.**
- oxbus-redis: the oxbus flow of ``bench_redis.py`` over Redis Streams (same events, batches
               and handler), for the comparison of the two brokers.

Target (DESIGN.md): oxbus-amqp >= 1.5x the aio-pika flow.

    .venv/bin/python benches/bench_amqp.py            # N=50000, 3 runs each (~1-2 min)
    .venv/bin/python benches/bench_amqp.py --quick    # N=10000, 1 run each

aio-pika is installed with pip if it is missing. Every exchange and queue the benchmark makes
starts with ``oxbus-bench.<uuid>`` (Redis keys with ``oxbus-bench:<uuid>``) and is deleted
after its run. Exit status 0 whether the target passes or misses; 1 when something is wrong
(a run hangs, a process fails, or a consumer did not handle each event exactly once); 2 when a
broker is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

HERE = os.path.abspath(__file__)


def _event_class() -> type:
    from oxbus import DomainEvent

    class BenchOrderPlaced(DomainEvent):
        def __init__(self, order_id: str, n: int, amount: float, **kw: Any) -> None:
            super().__init__(**kw)
            self.order_id = order_id
            self.n = n
            self.amount = amount

        @property
        def aggregate_id(self) -> str:
            return self.order_id

    return BenchOrderPlaced


def _events(cls: type, n: int) -> list[Any]:
    return [cls(f"order-{i % 64}", i, 9.5 + i % 7) for i in range(n)]


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------------- child processes


def _bus(a: argparse.Namespace) -> Any:
    from oxbus import EventBus

    if a.impl == "oxbus-redis":
        return EventBus(transport=a.redis, group="bench", stream=a.name, prefetch=a.prefetch)
    return EventBus(transport=a.amqp, group="bench", exchange=a.name, prefetch=a.prefetch)


async def _oxbus_consumer(a: argparse.Namespace) -> None:
    cls = _event_class()
    bus = _bus(a)
    seen = bytearray(a.n)
    count = 0
    done = asyncio.Event()

    def handle(e: Any) -> None:
        nonlocal count
        seen[e.n] += 1
        count += 1
        if count == a.n:
            done.set()

    bus.subscribe(cls, handle)
    await bus.start()
    _say("ready")
    await done.wait()
    t_end = time.monotonic()
    await bus.stop(timeout=30)
    _say("done", t_end, count, sum(1 for x in seen if x != 1))


async def _oxbus_publisher(a: argparse.Namespace) -> None:
    cls = _event_class()
    events = _events(cls, a.n)
    batches = [events[i : i + a.batch] for i in range(0, a.n, a.batch)]
    bus = _bus(a)  # no subscriptions: a publish-only bus
    await bus.start()
    t0 = time.monotonic()
    for b in batches:
        await bus.publish_many(b)
    t1 = time.monotonic()
    await bus.stop(timeout=30)
    _say("published", t0, t1)


def _payload(e: Any) -> bytes:
    return json.dumps(
        {
            "event_id": e.event_id,
            "event_type": "BenchOrderPlaced",
            "event_version": 1,
            "occurred_at": e.occurred_at.isoformat(),
            "data": {"order_id": e.order_id, "n": e.n, "amount": e.amount},
            "metadata": {"correlation_id": e.correlation_id, "causation_id": None},
        },
        separators=(",", ":"),
    ).encode()


async def _pika_topology(a: argparse.Namespace, channel: Any) -> tuple[Any, Any]:
    import aio_pika

    exchange = await channel.declare_exchange(a.name, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(
        f"{a.name}.bench", durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange, routing_key="BenchOrderPlaced")
    return exchange, queue


async def _pika_consumer(a: argparse.Namespace) -> None:
    import aio_pika

    cls = _event_class()
    conn = await aio_pika.connect(a.amqp)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=a.prefetch)
    _, queue = await _pika_topology(a, channel)
    seen = bytearray(a.n)
    count = 0
    done = asyncio.Event()

    def handle(e: Any) -> None:
        nonlocal count
        seen[e.n] += 1
        count += 1
        if count == a.n:
            done.set()

    async def on_message(message: Any) -> None:
        p = json.loads(message.body)
        e = cls.__new__(cls)
        d = e.__dict__
        d.update(p["data"])
        d["event_id"] = p["event_id"]
        d["occurred_at"] = datetime.fromisoformat(p["occurred_at"])
        d["correlation_id"] = p["metadata"]["correlation_id"]
        handle(e)
        await message.ack()

    await queue.consume(on_message)
    _say("ready")
    await done.wait()
    t_end = time.monotonic()
    await conn.close()
    _say("done", t_end, count, sum(1 for x in seen if x != 1))


async def _pika_publisher(a: argparse.Namespace) -> None:
    import aio_pika

    cls = _event_class()
    events = _events(cls, a.n)
    batches = [events[i : i + a.batch] for i in range(0, a.n, a.batch)]
    conn = await aio_pika.connect(a.amqp)
    channel = await conn.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(a.name, aio_pika.ExchangeType.TOPIC, durable=True)
    t0 = time.monotonic()
    for b in batches:
        await asyncio.gather(
            *(
                exchange.publish(
                    aio_pika.Message(
                        _payload(e),
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=e.event_id,
                        correlation_id=e.correlation_id,
                        type="BenchOrderPlaced",
                        headers={"key": e.order_id},
                    ),
                    routing_key="BenchOrderPlaced",
                )
                for e in b
            )
        )
    t1 = time.monotonic()
    await conn.close()
    _say("published", t0, t1)


def _child(a: argparse.Namespace) -> None:
    if a.impl == "aio-pika":
        asyncio.run(_pika_consumer(a) if a.child == "consumer" else _pika_publisher(a))
    else:
        asyncio.run(_oxbus_consumer(a) if a.child == "consumer" else _oxbus_publisher(a))


# ------------------------------------------------------------------------------ parent


class Problem(Exception):
    pass


def _spawn(impl: str, role: str, a: argparse.Namespace, name: str) -> subprocess.Popen[str]:
    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - read and closed by the caller
    args = [sys.executable, HERE, "--child", role, "--impl", impl, "--name", name]
    args += ["--amqp", a.amqp, "--redis", a.redis, "-n", str(a.n), "--batch", str(a.batch)]
    args += ["--prefetch", str(a.prefetch)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
    p.err_file = err  # type: ignore[attr-defined]
    return p


def _line(p: subprocess.Popen[str], what: str) -> list[str]:
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.err_file.seek(0)  # type: ignore[attr-defined]
        tail = p.err_file.read()[-400:]  # type: ignore[attr-defined]
        raise Problem(f"{what}: the process exited ({p.wait()}) without reporting: {tail}")
    return line.split()


def run_flow(impl: str, a: argparse.Namespace, i: int) -> dict[str, float]:
    name = f"{a.prefix}.{impl}.{i}" if impl != "oxbus-redis" else f"{a.prefix}:{impl}:{i}"
    limit = max(60.0, a.n / 2000)
    procs: list[subprocess.Popen[str]] = []
    deadline = time.monotonic() + limit

    def watchdog() -> None:
        while time.monotonic() < deadline:
            if procs and all(p.poll() is not None for p in procs):
                return
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        consumer = _spawn(impl, "consumer", a, name)
        procs.append(consumer)
        if _line(consumer, f"{impl} consumer") != ["ready"]:
            raise Problem(f"{impl} consumer did not start")
        publisher = _spawn(impl, "publisher", a, name)
        procs.append(publisher)
        pub = _line(publisher, f"{impl} publisher")
        con = _line(consumer, f"{impl} consumer (hung? limit {limit:.0f}s)")
        for p in procs:
            if p.wait(timeout=max(0.1, deadline - time.monotonic())) != 0:
                raise Problem(f"{impl}: a process exited with {p.returncode}")
        t0, t1 = float(pub[1]), float(pub[2])
        t_end, count, wrong = float(con[1]), int(con[2]), int(con[3])
        if count != a.n or wrong:
            raise Problem(f"{impl}: handled {count} of {a.n}; {wrong} not exactly once")
        return {"e2e": a.n / (t_end - t0), "publish": a.n / (t1 - t0)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
            p.err_file.close()  # type: ignore[attr-defined]
        asyncio.run(_clean(a, impl, name))


async def _clean(a: argparse.Namespace, impl: str, name: str) -> None:
    if impl == "oxbus-redis":
        _redis_del(a.redis, name)
        return
    import aio_pika

    conn = await aio_pika.connect(a.amqp)
    ch = await conn.channel()
    for q in (f"{name}.bench", f"{name}.bench.dead"):
        await ch.queue_delete(q)
    await ch.exchange_delete(name)
    await conn.close()


def _redis_del(url: str, key: str) -> None:
    host, _, rest = url.split("://", 1)[1].partition(":")
    port = int(rest.split("/", 1)[0] or 6379)
    with socket.create_connection((host, port), timeout=5) as s:
        k = key.encode()
        s.sendall(b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(k), k))
        s.recv(64)


def _reachable(a: argparse.Namespace) -> str | None:
    for what, host, port in (("RabbitMQ", "127.0.0.1", 5672), ("Redis", "127.0.0.1", 6379)):
        url = a.amqp if what == "RabbitMQ" else a.redis
        h, _, rest = url.split("@")[-1].split("://")[-1].partition(":")
        try:
            socket.create_connection((h or host, int(rest.split("/")[0] or port)), 3).close()
        except OSError as e:
            return f"{what} at {url.split('@')[-1]} is unreachable ({e})"
    return None


def _ensure_aio_pika() -> str:
    try:
        import aio_pika
    except ImportError:
        print("aio-pika is missing: pip install aio-pika", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aio-pika"], check=True)
        import aio_pika
    return str(aio_pika.__version__)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=50_000, help="events per run (50000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per flow (3)")
    p.add_argument("--batch", type=int, default=1000, help="publish batch size (1000)")
    p.add_argument("--prefetch", type=int, default=1000, help="consumer prefetch (1000)")
    p.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--quick", action="store_true", help="N=10000, 1 run")
    p.add_argument("--json", help="write every run to this file")
    p.add_argument("--child", choices=["consumer", "publisher"], help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _child(a)
        return 0
    if a.quick:
        a.n, a.repeat = 10_000, 1
    pika = _ensure_aio_pika()
    reason = _reachable(a)
    if reason:
        print(f"{reason}; nothing measured", file=sys.stderr)
        return 2
    import oxbus

    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
        cwd=os.path.dirname(HERE), check=False,
    ).stdout.strip()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    print(
        f"{now} UTC  CPython {platform.python_version()}  {os.cpu_count()} cpus  oxbus "
        f"{getattr(oxbus, '__version__', '?')} (git {git})  aio-pika {pika}  "
        f"load {os.getloadavg()[0]:.2f}"
    )
    print(f"command: python benches/bench_amqp.py {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"N={a.n} events per run, batches of {a.batch}, prefetch {a.prefetch}, "
        f"{a.repeat} runs per flow, interleaved\n"
    )
    a.prefix = f"oxbus-bench.{uuid.uuid4().hex[:12]}"
    flows = ("oxbus-amqp", "aio-pika", "oxbus-redis")
    results: dict[str, list[dict[str, float]]] = {f: [] for f in flows}
    problems: list[str] = []
    started = time.monotonic()
    for i in range(a.repeat):
        for name in flows:
            try:
                res = run_flow(name, a, i)
            except Problem as e:
                problems.append(str(e))
                print(f"  run {i + 1} {name:<12} PROBLEM: {e}", flush=True)
                continue
            results[name].append(res)
            print(
                f"  run {i + 1} {name:<12} {res['e2e']:>10,.0f} events/s  "
                f"(publisher alone {res['publish']:,.0f}/s)",
                flush=True,
            )

    def med(name: str, key: str = "e2e") -> float:
        xs = [r[key] for r in results[name]]
        return statistics.median(xs) if xs else float("nan")

    def spread(name: str) -> float:
        xs = [r["e2e"] for r in results[name]]
        return (max(xs) - min(xs)) / 2 / statistics.median(xs) * 100 if len(xs) > 1 else 0.0

    pk = med("aio-pika")
    print("\nEnd to end, publisher process -> consumer process, events/s (median)\n")
    print(f"{'flow':<56} {'events/s':>9} {'publisher':>10} {'spread':>7}  vs aio-pika")
    labels = {
        "oxbus-amqp": "oxbus over RabbitMQ: publish_many(B) -> sync handler",
        "aio-pika": "aio-pika: confirms per batch -> handler -> ack",
        "oxbus-redis": "oxbus over Redis Streams: publish_many(B) -> sync handler",
    }
    for name in flows:
        print(
            f"{labels[name]:<56} {med(name):>9,.0f} {med(name, 'publish'):>10,.0f} "
            f"{spread(name):>6.0f}%  {med(name) / pk:>9.2f}x"
        )
    ratio = med("oxbus-amqp") / pk
    print("\nTarget (DESIGN.md)")
    print(
        f"  {'PASS' if ratio >= 1.5 else 'MISS'}  oxbus over RabbitMQ >= 1.5x the aio-pika flow: "
        f"{ratio:.2f}x ({med('oxbus-amqp'):,.0f} vs {pk:,.0f} events/s)"
    )
    print(
        f"  (RabbitMQ vs Redis Streams, both oxbus: "
        f"{med('oxbus-amqp') / med('oxbus-redis'):.2f}x)"
    )
    if problems:
        print("\nProblems:")
        for pr in problems:
            print("  " + pr)
    print(f"\ntotal {time.monotonic() - started:.0f}s; load at the end {os.getloadavg()[0]:.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"n": a.n, "batch": a.batch, "results": results}, f, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
