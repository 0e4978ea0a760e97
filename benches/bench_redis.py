"""End-to-end events/s over Redis Streams between two processes (issue 5).

A publisher process sends N events to a stream; a consumer process, in one consumer group,
handles them. The clock starts in the publisher just before its first publish and stops in
the consumer when it has handled the N-th event (both read CLOCK_MONOTONIC, which all
processes of a machine share). Three flows, in the same run, interleaved:

- oxbus:     ``EventBus(transport=url, group=..., stream=...)``; the publisher calls
             ``await bus.publish_many(batch)`` over batches of B; the consumer subscribes a sync
             handler. Events are ``DomainEvent`` objects, rebuilt as their class on the consumer.
- redis-py:  the same flow by hand, ``redis`` (redis-py) sync client: the publisher encodes each
             event as the same JSON (identity, type, data, metadata) and ``XADD ... MAXLEN ~``
             pipelined in batches of B (``pipeline(transaction=False)``); the consumer loops
             ``XREADGROUP COUNT B BLOCK`` -> ``json.loads`` -> rebuild the object -> handler,
             then one ``XACK`` of the batch's ids.
- ceiling:   ``redis-benchmark -q -n N -P 64 XADD <scratch key> '*' f v`` (pipelined XADD only:
             no consumer, no encoding); its own events/s.

Two more rows show which side limits: "publisher" (N / the publisher's own time, from the
end-to-end runs) and "consumer alone" (the group is created, the flow's publisher publishes all N
and exits, then the flow's consumer process starts and drains that backlog; timed from just
before it connects to its N-th event).

Target (issue 5): oxbus >= 1.5x the redis-py flow.

    .venv/bin/python benches/bench_redis.py            # N=200000, 3 runs each (~1-2 min)
    .venv/bin/python benches/bench_redis.py --quick    # N=20000, 1 run each (~10 s)

redis-py is installed into the running interpreter with pip if it is missing. Every key the
benchmark makes starts with ``oxbus-bench:<uuid>`` and is deleted afterwards; the server is
never flushed. Exit status 0 whether the target passes or misses; 1 when something is wrong
(a run hangs, a process fails, or the consumer did not handle each event exactly once); 2 when
Redis is unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from typing import Any

HERE = os.path.abspath(__file__)
MAXLEN = 1_000_000


# --------------------------------------------------------------------------- the event


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


# ---------------------------------------------------------------------- child processes


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


async def _oxbus_consumer(a: argparse.Namespace) -> None:
    from oxbus import EventBus

    cls = _event_class()
    bus = EventBus(transport=a.url, group=a.group, stream=a.stream, consumer="c1", maxlen=MAXLEN)
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
    t_start = time.monotonic()
    await bus.start()
    _say("ready")
    await done.wait()
    t_end = time.monotonic()
    await bus.stop(timeout=30)
    _say("done", t_end, count, sum(1 for x in seen if x != 1), t_start)


async def _oxbus_publisher(a: argparse.Namespace) -> None:
    from oxbus import EventBus

    cls = _event_class()
    events = _events(cls, a.n)
    batches = [events[i : i + a.batch] for i in range(0, a.n, a.batch)]
    # No subscriptions: a publish-only bus, which joins no group and reads nothing back.
    bus = EventBus(transport=a.url, group=a.group, stream=a.stream, maxlen=MAXLEN)
    await bus.start()
    t0 = time.monotonic()
    for b in batches:
        await bus.publish_many(b)
    t1 = time.monotonic()
    await bus.stop(timeout=30)
    _say("published", t0, t1)


def _redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def _payload(e: Any) -> str:
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
    )


def _redispy_consumer(a: argparse.Namespace) -> None:
    import redis

    cls = _event_class()
    r = _redis_client(a.url)
    t_start = time.monotonic()
    try:
        r.xgroup_create(a.stream, a.group, id="$", mkstream=True)
    except redis.ResponseError as e:  # the backlog run created it before publishing
        if "BUSYGROUP" not in str(e):
            raise
    seen = bytearray(a.n)
    count = 0

    def handle(e: Any) -> None:
        nonlocal count
        seen[e.n] += 1
        count += 1

    _say("ready")
    while count < a.n:
        reply = r.xreadgroup(a.group, "c1", {a.stream: ">"}, count=a.batch, block=1000)
        for stream, entries in reply or ():
            ids = []
            for eid, fields in entries:
                p = json.loads(fields[b"d"])
                e = cls.__new__(cls)
                d = e.__dict__
                d.update(p["data"])
                d["event_id"] = p["event_id"]
                d["occurred_at"] = datetime.fromisoformat(p["occurred_at"])
                d["correlation_id"] = p["metadata"]["correlation_id"]
                handle(e)
                ids.append(eid)
            r.xack(stream, a.group, *ids)
    t_end = time.monotonic()
    _say("done", t_end, count, sum(1 for x in seen if x != 1), t_start)


def _redispy_publisher(a: argparse.Namespace) -> None:
    cls = _event_class()
    events = _events(cls, a.n)
    batches = [events[i : i + a.batch] for i in range(0, a.n, a.batch)]
    r = _redis_client(a.url)
    r.ping()
    t0 = time.monotonic()
    for b in batches:
        pipe = r.pipeline(transaction=False)
        for e in b:
            pipe.xadd(a.stream, {"d": _payload(e)}, maxlen=MAXLEN, approximate=True)
        pipe.execute()
    t1 = time.monotonic()
    _say("published", t0, t1)


def _child(a: argparse.Namespace) -> None:
    if a.impl == "oxbus":
        asyncio.run(_oxbus_consumer(a) if a.role == "consumer" else _oxbus_publisher(a))
    elif a.role == "consumer":
        _redispy_consumer(a)
    else:
        _redispy_publisher(a)


# ------------------------------------------------------------------------------ parent


class Problem(Exception):
    pass


# What the child processes wrote to stderr (logged errors), by "impl role": listed as notes.
NOTES: dict[str, list[str]] = {}


def _spawn(
    impl: str, role: str, a: argparse.Namespace, stream: str, group: str
) -> subprocess.Popen[str]:
    err = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in _collect_stderr
    p = subprocess.Popen(
        [
            sys.executable,
            HERE,
            "--child",
            role,
            "--impl",
            impl,
            "--url",
            a.url,
            "--stream",
            stream,
            "--group",
            group,
            "-n",
            str(a.n),
            "--batch",
            str(a.batch),
        ],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
    )
    p.err_file = err  # type: ignore[attr-defined]
    p.label = f"{impl} {role}"  # type: ignore[attr-defined]
    return p


def _collect_stderr(p: subprocess.Popen[str]) -> None:
    err = p.err_file  # type: ignore[attr-defined]
    err.seek(0)
    lines = [x for x in err.read().splitlines() if x.strip()]
    err.close()
    if lines:
        last = next((x for x in reversed(lines) if not x.startswith(" ")), lines[-1])
        NOTES.setdefault(p.label, []).append(  # type: ignore[attr-defined]
            f"{sum(1 for x in lines if 'Traceback' in x)} traceback(s), last line: {last.strip()}"
        )


def _line(p: subprocess.Popen[str], what: str, deadline: float) -> list[str]:
    # readline blocks; a hung child is caught by the watchdog that kills it at the deadline.
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        rc = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        raise Problem(f"{what}: the process exited ({rc}) without reporting")
    return line.split()


def run_flow(
    impl: str, a: argparse.Namespace, prefix: str, i: int, backlog: bool = False
) -> dict[str, float]:
    """End to end (consumer running while the publisher publishes), or with ``backlog``: the
    group is created, the publisher publishes all N and exits, then the consumer starts and
    reads the backlog (timed from just before it connects to its N-th event)."""
    stream, group = f"{prefix}:{impl}:{'b' if backlog else 'e'}{i}", "bench"
    limit = max(60.0, a.n / 5000)
    deadline = time.monotonic() + limit
    procs: list[subprocess.Popen[str]] = []
    import threading

    def watchdog() -> None:
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in procs) and procs:
                return
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        if backlog:
            r = _redis_client(a.url)
            r.xgroup_create(stream, group, id="$", mkstream=True)
            r.close()
        else:
            consumer = _spawn(impl, "consumer", a, stream, group)
            procs.append(consumer)
            if _line(consumer, f"{impl} consumer", deadline) != ["ready"]:
                raise Problem(f"{impl} consumer did not start")
        publisher = _spawn(impl, "publisher", a, stream, group)
        procs.append(publisher)
        pub = _line(publisher, f"{impl} publisher", deadline)
        if backlog:
            if publisher.wait(timeout=max(0.1, deadline - time.monotonic())) != 0:
                raise Problem(f"{impl}: the publisher exited with {publisher.returncode}")
            consumer = _spawn(impl, "consumer", a, stream, group)
            procs.append(consumer)
            if _line(consumer, f"{impl} consumer", deadline) != ["ready"]:
                raise Problem(f"{impl} consumer did not start")
        con = _line(consumer, f"{impl} consumer (hung? limit {limit:.0f}s)", deadline)
        for p in procs:
            if p.wait(timeout=max(0.1, deadline - time.monotonic())) != 0:
                raise Problem(f"{impl}: a process exited with {p.returncode}")
        t0, t1 = float(pub[1]), float(pub[2])
        t_end, count, wrong, t_start = float(con[1]), int(con[2]), int(con[3]), float(con[4])
        if count != a.n or wrong:
            raise Problem(
                f"{impl}: consumer handled {count} of {a.n}; {wrong} events not exactly once"
            )
        if backlog:
            return {"e2e": a.n / (t_end - t_start)}
        return {"e2e": a.n / (t_end - t0), "publish": a.n / (t1 - t0)}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            if p.stdout is not None:
                p.stdout.close()
            _collect_stderr(p)
        _delete_prefix(a, stream)


def run_ceiling(a: argparse.Namespace, prefix: str, i: int) -> dict[str, float]:
    key = f"{prefix}:rb:{i}"
    host, port = _host_port(a.url)
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            host,
            "-p",
            str(port),
            "-q",
            "-n",
            str(a.n),
            "-P",
            "64",
            "XADD",
            key,
            "*",
            "f",
            "v",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=max(60.0, a.n / 5000),
    )
    _delete_prefix(a, key)
    m = re.search(r"([\d.]+) requests per second", out.stdout.replace("\r", "\n"))
    if out.returncode != 0 or m is None:
        raise Problem(f"redis-benchmark failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    return {"e2e": float(m.group(1))}


def _host_port(url: str) -> tuple[str, int]:
    m = re.match(r"rediss?://(?:[^@]*@)?([^:/]+)(?::(\d+))?", url)
    if not m:
        raise SystemExit(f"cannot read host and port from {url!r}")
    return m.group(1), int(m.group(2) or 6379)


def _delete_prefix(a: argparse.Namespace, prefix: str) -> None:
    r = _redis_client(a.url)
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)
    r.close()


def _ensure_redis_py() -> str:
    try:
        import redis
    except ImportError:
        print("redis-py is missing: pip install redis", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "redis"], check=True)
        import redis
    return str(redis.__version__)


def _header(a: argparse.Namespace, redis_py: str) -> str:
    import oxbus

    try:
        git = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            check=False,
            capture_output=True,
            text=True,
            cwd=os.path.dirname(HERE),
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = "?"
    r = _redis_client(a.url)
    server = r.info("server").get("redis_version", "?")
    r.close()
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return (
        f"{now} UTC  CPython {platform.python_version()}  {platform.machine()}  "
        f"{os.cpu_count()} cpus  oxbus {getattr(oxbus, '__version__', '?')} (git {git})  "
        f"redis-server {server}  redis-py {redis_py}  load {os.getloadavg()[0]:.2f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-n", type=int, default=200_000, help="events per run (200000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per flow (3)")
    p.add_argument("--batch", type=int, default=1000, help="publish / read batch size (1000)")
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--quick", action="store_true", help="N=20000, 1 run")
    p.add_argument("--json", help="write every run to this file")
    p.add_argument("--child", choices=["consumer", "publisher"], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["oxbus", "redispy"], help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)
    p.add_argument("--group", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.role = a.child
        _child(a)
        return 0
    if a.quick:
        a.n, a.repeat = 20_000, 1
    redis_py = _ensure_redis_py()
    try:
        r = _redis_client(a.url)
        r.ping()
        r.close()
    except Exception as e:  # noqa: BLE001 - any failure means: no server to measure
        print(f"Redis at {a.url} is unreachable ({e}); nothing measured", file=sys.stderr)
        return 2
    if shutil.which("redis-benchmark") is None:
        print("redis-benchmark is not installed; nothing measured", file=sys.stderr)
        return 2
    print(_header(a, redis_py))
    print(f"command: python benches/bench_redis.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"N={a.n} events per run, batches of {a.batch}, {a.repeat} runs per flow, interleaved\n")
    prefix = f"oxbus-bench:{uuid.uuid4().hex[:12]}"
    results: dict[str, list[dict[str, float]]] = {
        "oxbus": [],
        "redis-py": [],
        "ceiling": [],
        "oxbus-consumer": [],
        "redis-py-consumer": [],
    }
    problems: list[str] = []
    started = time.monotonic()
    for i in range(a.repeat):
        for name, run in (
            ("oxbus", lambda i=i: run_flow("oxbus", a, prefix, i)),
            ("redis-py", lambda i=i: run_flow("redispy", a, prefix, i)),
            ("ceiling", lambda i=i: run_ceiling(a, prefix, i)),
            ("oxbus-consumer", lambda i=i: run_flow("oxbus", a, prefix, i, backlog=True)),
            ("redis-py-consumer", lambda i=i: run_flow("redispy", a, prefix, i, backlog=True)),
        ):
            try:
                res = run()
            except Problem as e:
                problems.append(str(e))
                print(f"  run {i + 1} {name:<17} PROBLEM: {e}", flush=True)
                continue
            results[name].append(res)
            extra = f"  (publisher alone {res['publish']:,.0f}/s)" if "publish" in res else ""
            print(f"  run {i + 1} {name:<17} {res['e2e']:>12,.0f} events/s{extra}", flush=True)

    def med(name: str, key: str = "e2e") -> float:
        xs = [r[key] for r in results[name] if key in r]
        return statistics.median(xs) if xs else float("nan")

    def spread(name: str) -> float:
        xs = [r["e2e"] for r in results[name]]
        return (max(xs) - min(xs)) / 2 / statistics.median(xs) * 100 if len(xs) > 1 else 0.0

    ox, rp, ceil = med("oxbus"), med("redis-py"), med("ceiling")
    print("\nEnd to end, publisher process -> consumer process, events/s (median)\n")
    print(f"{'flow':<44} {'events/s':>11} {'publisher':>11} {'spread':>7}  vs redis-py  of ceiling")
    rows = [
        ("oxbus: publish_many(B) -> sync handler", "oxbus"),
        ("redis-py: pipelined XADD -> XREADGROUP/XACK", "redis-py"),
        ("redis-benchmark -P 64 XADD (ceiling)", "ceiling"),
    ]
    for label, name in rows:
        pub = med(name, "publish")
        pubs = f"{'-':>11}" if math.isnan(pub) else f"{pub:>11,.0f}"
        print(
            f"{label:<44} {med(name):>11,.0f} {pubs} {spread(name):>6.0f}%"
            f"  {med(name) / rp:>10.2f}x  {med(name) / ceil:>8.1%}"
        )
    print(
        "\n(publisher: N / the publisher's own time; spread: half-range of the runs, % of median)"
    )
    oc, rc = med("oxbus-consumer"), med("redis-py-consumer")
    print("\nConsumer alone: a backlog of N events read by a consumer process, events/s (median)\n")
    print(f"{'flow':<44} {'events/s':>11} {'spread':>7}  vs redis-py")
    print(
        f"{'oxbus: EventBus consumer, sync handler':<44} {oc:>11,.0f} {spread('oxbus-consumer'):>6.0f}%  {oc / rc:>9.2f}x"
    )
    print(
        f"{'redis-py: XREADGROUP -> handler -> XACK':<44} {rc:>11,.0f} {spread('redis-py-consumer'):>6.0f}%  {1.0:>9.2f}x"
    )
    ratio = ox / rp
    verdict = "PASS" if ratio >= 1.5 else "MISS"
    print("\nTarget (issue 5)")
    print(
        f"  {verdict}  oxbus >= 1.5x the redis-py flow: {ratio:.2f}x ({ox:,.0f} vs {rp:,.0f} events/s)"
    )
    print(
        f"  oxbus reaches {ox / ceil:.1%} of the redis-benchmark ceiling, redis-py {rp / ceil:.1%}"
    )
    print(f"  (consumer alone: oxbus {oc / rc:.2f}x redis-py)")
    if NOTES:
        print("\nNotes: the child processes wrote to stderr (counts are unaffected)")
        for label, notes in NOTES.items():
            print(f"  {label}: in {len(notes)} of its runs; e.g. {notes[-1]}")
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
