"""What partition leases cost (issue 17): events/s over Redis Streams with 4 partitions, handled
by 1 member process and by 2 member processes of one group, in the same run.

Each run: the member processes start (``EventBus(transport=url, group=..., partitions=P)``, a
sync handler that counts) and settle their leases (the parent waits until every partition is
held, evenly); then a publisher process sends N events over 64 keys with ``publish_many``
batches of B. The clock starts in the publisher just before its first publish and stops at the
last event handled by any member (every process reads CLOCK_MONOTONIC, which a machine's
processes share). Members report their count every 1000 events; the run ends when the counts
add up to N, and each member then checks it handled every event it got exactly once.

Rows, interleaved run by run:

- ``2 members x 4 partitions``: two processes, two partitions each (leases held and renewed);
- ``1 member x 4 partitions``: one process holding all four leases;
- ``2 members x 1 stream``, ``1 member x 1 stream``: no leases at all (one stream that every
  member reads, sharing its entries): the same process counts without any lease.

Target (issue 17): 2 members x 4 partitions >= 90% of 1 member x 4 partitions (the leases
must not cost more than 10%). On a 2-core machine the members share the cores with the
publisher and Redis, so a second member process adds contention rather than speed; the rows
without leases separate that from what the leases cost (2 members x 4 partitions against
2 members x 1 stream, 1 member x 4 partitions against 1 member x 1 stream).

    .venv/bin/python benches/bench_redis_leases.py            # N=100000, 3 runs each
    .venv/bin/python benches/bench_redis_leases.py --quick    # N=20000, 1 run each

Needs the Redis on 127.0.0.1:6379 (``--url``) and redis-py (installed with pip if missing, for
the clean-up); every key starts with ``oxbus-bench:<uuid>`` and is deleted afterwards. Exit
status 0 whether the target passes or misses, 1 when a run hangs or an event is lost or handled
twice, 2 without Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import bench_redis as br

HERE = os.path.abspath(__file__)


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------------- child processes


async def _member(a: argparse.Namespace) -> None:
    from oxbus import EventBus

    cls = br._event_class()
    bus = EventBus(
        transport=a.url,
        group="bench",
        consumer=a.name,
        stream=a.stream,
        partitions=a.partitions,
        maxlen=br.MAXLEN,
    )
    seen = bytearray(a.n)
    count = 0

    def handle(e: Any) -> None:
        nonlocal count
        seen[e.n] += 1
        count += 1
        # Every 1000, and each of the last 1000 published: a member's last event is among
        # those (64 keys, published round-robin), so its final count is always reported.
        if count % 1000 == 0 or e.n >= a.n - 1000:
            _say("p", count, time.monotonic())

    bus.subscribe(cls, handle)
    await bus.start()
    loop = asyncio.get_running_loop()
    cpu0 = time.process_time()  # every thread of the process: the loop's and the engine's
    _say("ready")

    async def report_leases() -> None:
        owned = None
        while True:
            now = bus.get_statistics()["partitions"]["owned"]
            if now != owned:
                owned = now
                _say("owns", json.dumps(now))
            await asyncio.sleep(0.1)

    watcher = loop.create_task(report_leases())
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin at the end
    cpu = time.process_time() - cpu0
    watcher.cancel()
    await bus.stop(timeout=30)
    _say("done", count, sum(1 for x in seen if x > 1), cpu)


async def _publisher(a: argparse.Namespace) -> None:
    from oxbus import EventBus

    cls = br._event_class()
    events = br._events(cls, a.n)
    batches = [events[i : i + a.batch] for i in range(0, a.n, a.batch)]
    bus = EventBus(
        transport=a.url,
        group="publisher",
        stream=a.stream,
        partitions=a.partitions,
        maxlen=br.MAXLEN,
    )
    await bus.start()
    t0 = time.monotonic()
    for b in batches:
        await bus.publish_many(b)
    t1 = time.monotonic()
    await bus.stop(timeout=30)
    _say("published", t0, t1)


# ------------------------------------------------------------------------------ parent


class Problem(Exception):
    pass


def _spawn(a: argparse.Namespace, role: str, stream: str, partitions: int, name: str = "") -> Any:
    return subprocess.Popen(
        [
            sys.executable,
            HERE,
            "--child",
            role,
            "--url",
            a.url,
            "--stream",
            stream,
            "--partitions",
            str(partitions),
            "-n",
            str(a.n),
            "--batch",
            str(a.batch),
            "--name",
            name,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


class Reader(threading.Thread):
    """Reads a member's lines: its partitions, its progress."""

    def __init__(self, p: Any, changed: threading.Condition) -> None:
        super().__init__(daemon=True)
        self.p, self.changed = p, changed
        self.owned: list[int] = []
        self.count, self.t_last = 0, 0.0
        self.done: list[str] | None = None
        self.start()

    def run(self) -> None:
        for line in self.p.stdout:
            parts = line.split()
            with self.changed:
                if parts[0] == "owns":
                    self.owned = json.loads(line[5:])
                elif parts[0] == "p":
                    self.count, self.t_last = int(parts[1]), float(parts[2])
                elif parts[0] == "done":
                    self.done = parts
                self.changed.notify_all()


def run_flow(
    a: argparse.Namespace, prefix: str, members: int, partitions: int, i: int
) -> dict[str, float]:
    stream = f"{prefix}:m{members}p{partitions}:{i}"
    limit = max(60.0, a.n / 2000)
    deadline = time.monotonic() + limit
    procs: list[Any] = []
    changed = threading.Condition()
    try:
        readers = []
        for k in range(members):
            p = _spawn(a, "member", stream, partitions, f"m{k}")
            procs.append(p)
            if p.stdout.readline().strip() != "ready":
                raise Problem(f"member m{k} did not start")
            readers.append(Reader(p, changed))

        def wait(pred: Any, what: str) -> None:
            with changed:
                if not changed.wait_for(pred, timeout=max(0.1, deadline - time.monotonic())):
                    raise Problem(f"timed out waiting for {what}")

        def settled() -> bool:
            owned = [len(r.owned) for r in readers]
            if partitions == 1:  # no leases: every member reads the one stream
                return min(owned) == 1
            return sum(owned) == partitions and max(owned) - min(owned) <= 1

        wait(settled, "the leases to settle")
        pub = _spawn(a, "publisher", stream, partitions)
        procs.append(pub)
        line = pub.stdout.readline().split()
        if not line or line[0] != "published":
            raise Problem("the publisher did not report")
        t0 = float(line[1])
        wait(lambda: sum(r.count for r in readers) >= a.n, "every event handled")
        t_end = max(r.t_last for r in readers)
        for p in procs:
            if p.stdin:
                p.stdin.close()
        wait(lambda: all(r.done is not None for r in readers), "the members to stop")
        total = sum(int(r.done[1]) for r in readers if r.done)
        twice = sum(int(r.done[2]) for r in readers if r.done)
        if total != a.n or twice:
            raise Problem(f"{total} handled of {a.n}, {twice} twice in one member")
        if members > 1 and not all(int(r.done[1]) for r in readers if r.done):
            raise Problem("a member handled nothing")
        cpu = sum(float(r.done[3]) for r in readers if r.done)
        return {
            "rate": a.n / (t_end - t0),
            "cpu_us": cpu / a.n * 1e6,
            "publisher": float(line[2]) - t0,
        }
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        br._delete_prefix(a, stream)


ROWS = (
    ("2 members x 4 partitions", 2, 4),
    ("1 member x 4 partitions", 1, 4),
    ("2 members x 1 stream (no leases)", 2, 1),
    ("1 member x 1 stream (no leases)", 1, 1),
)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "-n", type=int, default=100_000, help="events per run (100000; a multiple of 1000)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per row (3)")
    p.add_argument("--batch", type=int, default=1000, help="publish_many batch size (1000)")
    p.add_argument("--url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--quick", action="store_true", help="N=20000, 1 run")
    p.add_argument("--child", choices=["member", "publisher"], help=argparse.SUPPRESS)
    p.add_argument("--stream", help=argparse.SUPPRESS)
    p.add_argument("--partitions", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--name", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        asyncio.run(_member(a) if a.child == "member" else _publisher(a))
        return 0
    if a.quick:
        a.n, a.repeat = 20_000, 1
    a.n -= a.n % 1000
    redis_py = br._ensure_redis_py()
    try:
        r = br._redis_client(a.url)
        r.ping()
        r.close()
    except Exception as e:  # noqa: BLE001 - any failure means: no server to measure
        print(f"Redis at {a.url} is unreachable ({e}); nothing measured", file=sys.stderr)
        return 2
    print(br._header(a, redis_py))
    print(f"command: python benches/bench_redis_leases.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"N={a.n} events per run over 64 keys, batches of {a.batch}, {a.repeat} runs per row\n")
    prefix = f"oxbus-bench:{uuid.uuid4().hex[:12]}"
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _, _ in ROWS}
    problems: list[str] = []
    started = time.monotonic()
    for i in range(a.repeat):
        for label, members, partitions in ROWS:
            try:
                res = run_flow(a, prefix, members, partitions, i)
            except Problem as e:
                problems.append(f"{label}: {e}")
                print(f"  run {i + 1} {label:<32} PROBLEM: {e}", flush=True)
                continue
            results[label].append(res)
            print(
                f"  run {i + 1} {label:<32} {res['rate']:>10,.0f} events/s"
                f"  {res['cpu_us']:>6.1f} us CPU/event",
                flush=True,
            )

    def med(label: str, key: str = "rate") -> float:
        xs = [r[key] for r in results[label]]
        return statistics.median(xs) if xs else float("nan")

    base = med("1 member x 4 partitions")
    print("\nPublisher process -> member process(es), medians\n")
    print(
        f"{'flow':<34} {'events/s':>10}  {'vs 1x4':>6}  {'members CPU/event':>17}"
        f"  {'publisher s':>11}"
    )
    for label, _, _ in ROWS:
        print(
            f"{label:<34} {med(label):>10,.0f}  {med(label) / base:>5.2f}x"
            f"  {med(label, 'cpu_us'):>14.1f} us  {med(label, 'publisher'):>11.2f}"
        )
    print(
        "\n(members CPU/event: the member processes' CPU time, every thread, from start to the"
        "\nlast event, over N; publisher s: the publisher's own time for N events)"
    )
    ratio = med("2 members x 4 partitions") / base
    verdict = "PASS" if ratio >= 0.9 else "MISS"
    print("\nTarget (issue 17)")
    print(f"  {verdict}  2 members x 4 partitions >= 90% of 1 member x 4 partitions: {ratio:.0%}")
    for members in (2, 1):
        x = f"{members} member{'s' if members > 1 else ''}"
        leased = f"{x} x 4 partitions"
        free = f"{x} x 1 stream (no leases)"
        print(
            f"  {x}, leases against none: {med(leased) / med(free):.0%} of the events/s, "
            f"{med(leased, 'cpu_us') / med(free, 'cpu_us'):.0%} of the CPU per event"
        )
    if problems:
        print("\nProblems:")
        for pr in problems:
            print("  " + pr)
    print(f"\ntotal {time.monotonic() - started:.0f}s; load at the end {os.getloadavg()[0]:.2f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
