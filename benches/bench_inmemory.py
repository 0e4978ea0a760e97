#!/usr/bin/env python3
"""In-memory throughput and latency: oxbus against the pure-Python bus it replaces.

    .venv/bin/python benches/bench_inmemory.py            # full run (~200k events, 5 runs, medians)
    .venv/bin/python benches/bench_inmemory.py --quick    # smoke run (seconds)

Throughput is end to end: the clock starts before the first publish and stops when every
handler call has returned (``drain()``), so events/s = N / that time. Each measurement is
repeated and the median reported; peers are interleaved run by run so drift hits all alike.
Events are created (fresh for every run, identically for every peer) outside the timed region.

Peers, all with the same trivial handler (it counts its calls) and the same events:
  bare loop      ``for e in events: h(e)`` / ``await h(e)`` (x4: over the 4 handlers) - the limit
  pure-Py bus    benches/purepy_bus.py: seed 000's asyncio.Queue bus, ``await publish(e)``
  oxbus publish  ``await bus.publish(e)`` per event
  oxbus many     ``await bus.publish_many(batch)`` over batches of --batch events
  pyee, blinker  optional, if importable (no queue, no workers: dispatch in the emit call)

Then latency: events published at a steady --rate (scheduled on loop time, so sleep error does
not accumulate) for --seconds; the handler records perf_counter() - the publish stamp.

The targets of DESIGN.md are checked and printed as PASS/MISS. Exit status is 0 unless a run
hangs or the numbers of handled events are wrong (then 1): misses alone do not fail.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import faulthandler
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import purepy_bus  # noqa: E402

import oxbus  # noqa: E402
from oxbus import DomainEvent, EventBus  # noqa: E402

try:
    from pyee.asyncio import AsyncIOEventEmitter
except ImportError:  # pragma: no cover - optional peer
    AsyncIOEventEmitter = None
try:
    import blinker
except ImportError:  # pragma: no cover - optional peer
    blinker = None

pc = time.perf_counter
KEYS = [f"order-{k}" for k in range(64)]


class OrderPlaced(DomainEvent):
    def __init__(self, order_id: str, amount: float) -> None:
        super().__init__()
        self.order_id = order_id
        self.amount = amount

    @property
    def aggregate_id(self) -> str:
        return self.order_id


def make_events(n: int) -> list[OrderPlaced]:
    return [OrderPlaced(KEYS[i & 63], float(i)) for i in range(n)]


class Counter:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


def make_handlers(kind: str, subs: int) -> tuple[list[Callable[[Any], Any]], Counter]:
    c = Counter()
    hs: list[Callable[[Any], Any]] = []
    for _ in range(subs):
        if kind == "async":
            async def h(e: Any, c: Counter = c) -> None:
                c.n += 1
        else:
            def h(e: Any, c: Counter = c) -> None:  # type: ignore[misc]
                c.n += 1
        hs.append(h)
    return hs, c


# ------------------------------------------------------------------------ one run of each peer
# Each returns the elapsed seconds of the timed region; `info` receives the bus and its stats.

async def run_bare(kind: str, hs: list, events: list, info: dict) -> float:
    if kind == "sync":
        if len(hs) == 1:
            h = hs[0]
            t = pc()
            for e in events:
                h(e)
            return pc() - t
        t = pc()
        for e in events:
            for h in hs:
                h(e)
        return pc() - t
    if len(hs) == 1:
        h = hs[0]
        t = pc()
        for e in events:
            await h(e)
        return pc() - t
    t = pc()
    for e in events:
        for h in hs:
            await h(e)
    return pc() - t


async def run_purepy(kind: str, hs: list, events: list, info: dict, workers: int, qsize: int) -> float:
    bus = purepy_bus.InMemoryEventBus(worker_count=workers, max_queue_size=qsize)
    info["bus"] = bus
    for h in hs:
        bus.subscribe(OrderPlaced, h)
    await bus.start()
    publish = bus.publish
    t = pc()
    for e in events:
        await publish(e)
    await bus.drain()
    dt = pc() - t
    info["stats"] = bus.get_statistics()
    await bus.stop()
    return dt


async def run_oxbus(kind: str, hs: list, events: list, info: dict, workers: int, qsize: int) -> float:
    bus = EventBus(workers=workers, max_queue_size=qsize)
    info["bus"] = bus
    for h in hs:
        bus.subscribe(OrderPlaced, h)
    await bus.start()
    publish = bus.publish
    t = pc()
    for e in events:
        await publish(e)
    await bus.drain()
    dt = pc() - t
    info["stats"] = bus.get_statistics()
    await bus.stop()
    return dt


async def run_oxbus_many(kind: str, hs: list, events: list, info: dict, workers: int, qsize: int,
                         batch: int) -> float:
    bus = EventBus(workers=workers, max_queue_size=qsize)
    info["bus"] = bus
    for h in hs:
        bus.subscribe(OrderPlaced, h)
    batches = [events[i:i + batch] for i in range(0, len(events), batch)]
    await bus.start()
    publish_many = bus.publish_many
    t = pc()
    for b in batches:
        await publish_many(b)
    await bus.drain()
    dt = pc() - t
    info["stats"] = bus.get_statistics()
    await bus.stop()
    return dt


async def run_pyee(kind: str, hs: list, events: list, info: dict) -> float:
    ee = AsyncIOEventEmitter()
    for h in hs:
        ee.on("OrderPlaced", h)
    emit = ee.emit
    t = pc()
    for e in events:
        emit("OrderPlaced", e)
    await ee.wait_for_complete()
    return pc() - t


async def run_blinker(kind: str, hs: list, events: list, info: dict) -> float:
    sig = blinker.Signal()
    for h in hs:
        sig.connect(h, weak=False)
    if kind == "sync":
        send = sig.send
        t = pc()
        for e in events:
            send(e)
        return pc() - t
    send_async = sig.send_async
    t = pc()
    for e in events:
        await send_async(e)
    return pc() - t


# ------------------------------------------------------------------------------- measuring

PROBLEMS: list[str] = []
PROGRESS = sys.stderr.isatty()


def progress(msg: str) -> None:
    if PROGRESS:
        print(f"  {msg:<58}", end="\r", file=sys.stderr, flush=True)


def check_counts(label: str, n: int, subs: int, counter: Counter, info: dict) -> None:
    if counter.n != n * subs:
        PROBLEMS.append(f"{label}: handlers ran {counter.n} times, expected {n * subs}")
    s = info.get("stats")
    if s is None:
        return
    want = {"events_published": n, "events_processed": n, "events_failed": 0, "queue_size": 0}
    if "in_flight" in s:
        want["in_flight"] = 0
    if "handler_calls" in s:
        want["handler_calls"] = n * subs
    bad = {k: s.get(k) for k, v in want.items() if s.get(k) != v}
    if bad:
        PROBLEMS.append(f"{label}: statistics after drain {bad}, expected {want}")


async def measure(label: str, fn: Callable, kind: str, subs: int, n: int, timeout: float,
                  *args: Any) -> float | None:
    """One timed run: fresh events and handlers, returns events/s (None on a hang)."""
    hs, counter = make_handlers(kind, subs)
    events = make_events(n)
    gc.collect()
    gc.freeze()  # the pre-made events are not the peers' garbage: keep them out of GC scans
    info: dict = {}
    faulthandler.dump_traceback_later(timeout + 60, exit=True)  # a hang that blocks the loop
    try:
        dt = await asyncio.wait_for(fn(kind, hs, events, info, *args), timeout)
    except asyncio.TimeoutError:
        bus = info.get("bus")
        stats = bus.get_statistics() if bus is not None else None
        PROBLEMS.append(f"{label}: HANG, not done after {timeout:.0f}s; handlers ran "
                        f"{counter.n}/{n * subs}; stats {stats}")
        return None
    finally:
        faulthandler.cancel_dump_traceback_later()
        gc.unfreeze()
    check_counts(label, n, subs, counter, info)
    del events, hs
    return n / dt


def med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def spread(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    return (max(xs) - min(xs)) / 2 / statistics.median(xs)


async def throughput(args: argparse.Namespace) -> dict:
    """results[(kind, subs, workers, peer)] = [events/s per run]; workers 0 = no workers."""
    n, reps, q = args.n, args.repeat, args.queue
    results: dict[tuple, list] = {}
    tmo = max(60.0, n / 5_000)  # a hang, not a slow run: the slowest bus here does ~50k/s

    def add(key: tuple, v: float | None) -> None:
        results.setdefault(key, []).append(v)

    for kind in ("async", "sync"):
        for subs in (1, 4):
            for r in range(reps):
                tag = f"{kind} x{subs} run {r + 1}/{reps}"
                progress(f"{tag} ...")
                add((kind, subs, 0, "bare"), await measure(f"bare {tag}", run_bare, kind, subs, n, tmo))
                if AsyncIOEventEmitter is not None:
                    pn = n // 10 if kind == "async" else n  # pyee spawns a task per async call
                    add((kind, subs, 0, "pyee"),
                        await measure(f"pyee {tag}", run_pyee, kind, subs, pn, tmo))
                if blinker is not None:
                    add((kind, subs, 0, "blinker"),
                        await measure(f"blinker {tag}", run_blinker, kind, subs, n, tmo))
                for w in (1, 4):
                    wt = f"{tag} workers={w}"
                    add((kind, subs, w, "purepy"),
                        await measure(f"pure-Py bus {wt}", run_purepy, kind, subs, n, tmo, w, q))
                    add((kind, subs, w, "oxbus"),
                        await measure(f"oxbus publish {wt}", run_oxbus, kind, subs, n, tmo, w, q))
                    add((kind, subs, w, "many"),
                        await measure(f"oxbus publish_many {wt}", run_oxbus_many, kind, subs, n,
                                      tmo, w, q, args.batch))
    progress("")
    return results


# -------------------------------------------------------------------------------- latency

async def latency_run(which: str, workers: int, rate: float, seconds: float, q: int) -> dict | None:
    lat: list[float] = []

    async def handler(e: Any) -> None:
        lat.append(pc() - e.t_pub)

    if which == "purepy":
        bus: Any = purepy_bus.InMemoryEventBus(worker_count=workers, max_queue_size=q)
    else:
        bus = EventBus(workers=workers, max_queue_size=q)
    bus.subscribe(OrderPlaced, handler)
    await bus.start()
    loop = asyncio.get_running_loop()
    publish = bus.publish
    n = int(rate * seconds)
    t0 = loop.time() + 0.005
    i = 0
    while i < n:
        # publish every event whose scheduled time (t0 + i/rate) has come, then sleep until
        # the next one: the schedule is absolute, so the sleep's overshoot never accumulates
        due = min(n, int((loop.time() - t0) * rate) + 1)
        while i < due:
            e = OrderPlaced(KEYS[i & 63], float(i))
            e.t_pub = pc()
            await publish(e)
            i += 1
        if i < n:
            await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
    elapsed = loop.time() - t0
    try:
        await asyncio.wait_for(bus.drain(), 30)
    except (asyncio.TimeoutError, TimeoutError):
        PROBLEMS.append(f"latency {which} workers={workers}: HANG in drain; "
                        f"{len(lat)}/{n} handled; stats {bus.get_statistics()}")
        return None
    await bus.stop()
    if len(lat) != n:
        PROBLEMS.append(f"latency {which} workers={workers}: {len(lat)} handled, expected {n}")
    warm = lat[min(len(lat) // 20, 200):]  # drop the first events (warm-up)
    warm.sort()

    def pct(p: float) -> float:
        return warm[min(len(warm) - 1, int(p * len(warm)))] * 1e6

    return {"p50": pct(0.50), "p99": pct(0.99), "max": warm[-1] * 1e6,
            "mean": statistics.fmean(warm) * 1e6, "rate": n / elapsed}


async def latency(args: argparse.Namespace) -> dict:
    out: dict[tuple, list] = {}
    for r in range(args.latency_repeat):
        for w in (1, 4):
            for which in ("purepy", "oxbus") if r % 2 == 0 else ("oxbus", "purepy"):
                progress(f"latency {which} workers={w} run {r + 1}/{args.latency_repeat} ...")
                res = await latency_run(which, w, args.rate, args.seconds, args.queue)
                out.setdefault((which, w), []).append(res)
    progress("")
    return out


# ------------------------------------------------------------------------------- reporting

def fmt(v: float | None) -> str:
    if v is None:
        return "HANG"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v / 1e3:.1f}k"


def ratio(a: float | None, b: float | None, pct: bool = False) -> str:
    if a is None or b is None:
        return "-"
    return f"{a / b * 100:.0f}%" if pct else f"{a / b:.2f}x"


def environment() -> str:
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                             timeout=5).stdout.strip()
    except Exception:
        rev = "?"
    so = oxbus._oxbus.__file__
    built = _dt.datetime.fromtimestamp(os.path.getmtime(so)).strftime("%Y-%m-%d %H:%M")
    return (f"{_dt.datetime.now():%Y-%m-%d %H:%M}  CPython {platform.python_version()}  "
            f"{platform.machine()}  {os.cpu_count()} cpus  oxbus {oxbus.__version__} "
            f"(git {rev}, built {built})  loop {type(asyncio.get_running_loop()).__module__}  "
            f"load {load()}")


def load() -> str:
    """The 1-minute load average: other work on the machine skews every number here."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def report(args: argparse.Namespace, res: dict, lat: dict) -> list[tuple[str, bool | None, str]]:
    M = lambda k: med(res.get(k, []))  # noqa: E731
    print(f"\nThroughput, events/s end to end (median of {args.repeat}; N={args.n}, "
          f"max_queue_size={args.queue}, publish_many batches of {args.batch})\n")
    hdr = (f"{'handler':<7} {'subs':>4} {'wrk':>3} | {'bare loop':>9} {'pure-Py':>8} "
           f"{'oxbus':>8} {'ox many':>8} | {'ox/py':>6} {'many/py':>7} | "
           f"{'py/bare':>7} {'ox/bare':>7} {'many/bare':>9} | {'spread':>6}")
    print(hdr)
    print("-" * len(hdr))
    for kind in ("async", "sync"):
        for subs in (1, 4):
            bare = M((kind, subs, 0, "bare"))
            for w in (1, 4):
                py, ox, many = (M((kind, subs, w, p)) for p in ("purepy", "oxbus", "many"))
                sp = max((spread(res.get((kind, subs, w, p), [])) or 0.0)
                         for p in ("purepy", "oxbus", "many"))
                print(f"{kind:<7} {'x' + str(subs):>4} {w:>3} | {fmt(bare):>9} {fmt(py):>8} "
                      f"{fmt(ox):>8} {fmt(many):>8} | {ratio(ox, py):>6} {ratio(many, py):>7} | "
                      f"{ratio(py, bare, True):>7} {ratio(ox, bare, True):>7} "
                      f"{ratio(many, bare, True):>9} | {sp * 100:>5.0f}%")
    print("\n(spread: the largest half-range of the runs among the three buses, as % of median)")

    if AsyncIOEventEmitter is None and blinker is None:
        print("\nOptional peers: pyee and blinker not importable - skipped "
              "(pip install pyee blinker)")
    else:
        print("\nOptional peers (no queue, no workers; events/s, vs the pure-Py bus with 1 worker)\n")
        for name, mod in (("pyee AsyncIOEventEmitter.emit", AsyncIOEventEmitter),
                          ("blinker Signal.send / send_async", blinker)):
            if mod is None:
                print(f"  {name}: not importable - skipped")
                continue
            key = "pyee" if "pyee" in name else "blinker"
            cells = []
            for kind in ("async", "sync"):
                for subs in (1, 4):
                    v = M((kind, subs, 0, key))
                    cells.append(f"{kind} x{subs} {fmt(v)} ({ratio(v, M((kind, subs, 1, 'purepy')))})")
            print(f"  {name:<33} " + "  ".join(cells))
        if AsyncIOEventEmitter is not None:
            print(f"  (pyee async rows use N/10 = {args.n // 10} events: one task per handler call)")

    print(f"\nLatency publish -> handler start, µs, async x1, {args.rate:.0f} events/s for "
          f"{args.seconds:g}s (median over {args.latency_repeat} runs)\n")
    lhdr = f"{'bus':<12} {'wrk':>3} | {'p50':>7} {'p99':>7} {'max':>8} {'mean':>7} | {'rate/s':>7}"
    print(lhdr)
    print("-" * len(lhdr))
    L: dict[tuple, dict] = {}
    for w in (1, 4):
        for which, name in (("purepy", "pure-Py bus"), ("oxbus", "oxbus")):
            runs = [r for r in lat.get((which, w), []) if r is not None]
            if not runs:
                print(f"{name:<12} {w:>3} | HANG")
                continue
            agg = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            L[(which, w)] = agg
            print(f"{name:<12} {w:>3} | {agg['p50']:>7.1f} {agg['p99']:>7.1f} {agg['max']:>8.0f} "
                  f"{agg['mean']:>7.1f} | {agg['rate']:>7.0f}")

    # ---- targets (DESIGN.md, "Targets", as issue 13 restates them)
    checks: list[tuple[str, bool | None, str]] = []

    def speedup(kind: str, subs: int, w: int, goal: float) -> None:
        py, ox = M((kind, subs, w, "purepy")), M((kind, subs, w, "oxbus"))
        name = f"await publish() + {kind} x{subs}, workers={w}: >= {goal:g}x pure-Py"
        if py is None or ox is None:
            checks.append((name, None, "no data (hang)"))
            return
        r = ox / py
        checks.append((name, r >= goal, f"{r:.2f}x ({(r / goal - 1) * 100:+.0f}% vs target)"))

    for kind, subs, goal in (("async", 1, 4), ("async", 4, 2), ("sync", 1, 5), ("sync", 4, 2.5)):
        speedup(kind, subs, 1, goal)
    # Issue 13: more workers must not cost much (they share one thread).
    for kind, subs in (("async", 1), ("async", 4), ("sync", 1), ("sync", 4)):
        one, four = M((kind, subs, 1, "oxbus")), M((kind, subs, 4, "oxbus"))
        name = f"await publish() + {kind} x{subs}: workers=4 >= 85% of workers=1"
        if one is None or four is None:
            checks.append((name, None, "no data (hang)"))
        else:
            r = four / one
            checks.append((name, r >= 0.85, f"{r * 100:.0f}% ({(r / 0.85 - 1) * 100:+.0f}% vs target)"))
    for w in (1, 4):
        many, bare = M(("async", 1, w, "many")), M(("async", 1, 0, "bare"))
        name = f"publish_many + async x1, workers={w}: >= 40% of bare await loop"
        if many is None or bare is None:
            checks.append((name, None, "no data (hang)"))
        else:
            r = many / bare
            checks.append((name, r >= 0.40, f"{r * 100:.1f}% ({(r / 0.40 - 1) * 100:+.0f}% vs target)"))
    for w in (1, 4):
        for p in ("p50", "p99"):
            name = f"latency {p} at {args.rate / 1000:g}k/s, workers={w}: oxbus <= pure-Py"
            a, b = L.get(("oxbus", w)), L.get(("purepy", w))
            if a is None or b is None:
                checks.append((name, None, "no data (hang)"))
            else:
                checks.append((name, a[p] <= b[p],
                               f"{a[p]:.1f} vs {b[p]:.1f} µs ({a[p] / b[p]:.2f}x)"))

    print("\nTargets (DESIGN.md, issue 13)\n")
    for name, ok, detail in checks:
        word = "PASS" if ok else ("MISS" if ok is False else "N/A ")
        print(f"  {word}  {name:<62} {detail}")
    return checks


async def main(args: argparse.Namespace) -> int:
    try:
        load0 = os.getloadavg()[0]
    except OSError:
        load0 = 0.0
    print(environment())
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    t = pc()
    res = await throughput(args)
    lat = await latency(args)
    report(args, res, lat)
    if PROBLEMS:
        print("\nProblems (wrong counts or hangs):")
        for p in PROBLEMS:
            print(f"  - {p}")
    print(f"\n(total {pc() - t:.0f}s, load at the end {load()})")
    try:
        end = os.getloadavg()[0]
    except OSError:
        end = 0.0
    if load0 > 0.7 or end > 1.7:  # this benchmark itself keeps one cpu busy
        print(f"WARNING: load average {load0:.2f} at the start, {end:.2f} at the end, on "
              f"{os.cpu_count()} cpus: other processes competed for the CPU; rerun on a quiet machine")
    if args.json:
        import json
        raw = {
            "environment": environment(),
            "args": vars(args),
            "throughput": [{"handler": k[0], "subs": k[1], "workers": k[2], "peer": k[3],
                            "events_per_s": v} for k, v in res.items()],
            "latency_us": [{"bus": k[0], "workers": k[1], "runs": v} for k, v in lat.items()],
            "problems": PROBLEMS,
        }
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
        print(f"raw runs written to {args.json}")
    return 1 if PROBLEMS else 0


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 20k events, 2 runs, short latency")
    ap.add_argument("-n", type=int, default=None, help="events per throughput run (200000)")
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement (5)")
    ap.add_argument("--batch", type=int, default=1000, help="publish_many batch size (1000)")
    ap.add_argument("--queue", type=int, default=10_000, help="max_queue_size of both buses")
    ap.add_argument("--rate", type=float, default=10_000.0, help="latency: events/s (10000)")
    ap.add_argument("--seconds", type=float, default=None, help="latency: seconds per run (2)")
    ap.add_argument("--latency-repeat", type=int, default=None, help="latency runs per bus (3)")
    ap.add_argument("--json", metavar="PATH", help="also write every run's numbers to PATH")
    ap.add_argument("--uvloop", action="store_true", help="run on uvloop instead of asyncio's loop")
    a = ap.parse_args()
    a.n = a.n or (20_000 if a.quick else 200_000)
    a.repeat = a.repeat or (2 if a.quick else 5)
    a.seconds = a.seconds or (0.3 if a.quick else 2.0)
    a.latency_repeat = a.latency_repeat or (1 if a.quick else 3)
    return a


if __name__ == "__main__":
    args = parse()
    if args.uvloop:
        import uvloop
        rc = uvloop.run(main(args))
    else:
        rc = asyncio.run(main(args))
    sys.exit(rc)
