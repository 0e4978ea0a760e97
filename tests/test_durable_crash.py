"""A durable bus killed with SIGKILL at random moments loses nothing (issue 3).

Each iteration runs a publisher process on a fresh SQLite file (publishing batches, or one event
per await: committed on the asyncio thread itself, see src/store/now.rs) and kills it with
SIGKILL after a random delay, then restarts a bus on the same file in another process and drains it. Every
handler call appends "subscription position key" to a record file with one unbuffered
``os.write`` (it survives the kill). Afterwards every committed event must have been handled by
every subscription at least once (losses must be 0), first deliveries must follow publish order
per key. What the killed bus recorded as done (the ``progress`` view, read between the kill and
the restart) must have been delivered before the kill and must not be delivered again, and the
repeats (deliveries lost from the record by the kill) must stay a few percent of all deliveries.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from oxbus import SqliteEventStore

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    import oxbus
    from oxbus import EventBus

    db, record, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def recorder(name):
        async def handler(event):
            env = oxbus.current_envelope()
            os.write(fd, f"{name} {env.position} {event['aggregate_id']}\\n".encode())
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        return handler

    async def main():
        bus = EventBus(store=db, workers=4)
        for name in ("audit", "billing"):
            bus.subscribe("order", recorder(name), name=name, from_beginning=True)
        async with bus:
            await bus.drain()
            if mode == "publish":
                print("ready", flush=True)
                i = 0
                while True:
                    await bus.publish_many(
                        [{"event_type": "order", "aggregate_id": f"k{(i + j) % 7}", "n": i + j}
                         for j in range(50)]
                    )
                    i += 50
            if mode == "publish-each":
                # One event per await from one task, then from four at once: commits made on
                # the asyncio thread itself, alone and shared by a batch.
                print("ready", flush=True)
                counter = iter(range(10**9))

                async def publisher():
                    while True:
                        i = next(counter)
                        await bus.publish({"event_type": "order", "aggregate_id": f"k{i % 7}", "n": i})

                async def alone():
                    for _ in range(300):
                        i = next(counter)
                        await bus.publish({"event_type": "order", "aggregate_id": f"k{i % 7}", "n": i})

                await alone()
                await asyncio.gather(*(publisher() for _ in range(4)))
        print("drained", flush=True)

    asyncio.run(main())
    """
)

ITERATIONS = 20
# Progress is committed with the next write, a few ms after a delivery: a kill loses the record
# of the last few. Measured 0.2-2.4% of deliveries repeated on an idle 2-core machine, 3-6.7%
# with the machine's two cores busy with other work (the writer thread then commits later); a
# replay from the start would be about 50%. The bound catches the latter, not the machine's load.
MAX_REPEAT_SHARE = 0.15


async def _committed(db: Path) -> list[tuple[int, str]]:
    async with SqliteEventStore(str(db)) as store:
        return [(e.position, e.data["aggregate_id"]) async for e in store.replay()]


def _done(db: Path) -> set[tuple[str, int]]:
    """What the killed bus recorded as finished, as (subscription, position)."""
    con = sqlite3.connect(db)
    try:
        return {(sub, pos) for sub, pos in con.execute("SELECT subscription, position FROM progress")}
    finally:
        con.close()


def _records(path: Path) -> list[tuple[str, int, str]]:
    out = []
    for line in path.read_text().splitlines():
        sub, pos, key = line.split()
        out.append((sub, int(pos), key))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("publishing", ["publish", "publish-each"])
def test_a_bus_killed_at_random_moments_redelivers_every_committed_event(
    tmp_path: Path, publishing: str
) -> None:
    rng = random.Random(20261126)
    total_events = total_deliveries = total_repeats = total_done = 0
    for it in range(ITERATIONS):
        db = tmp_path / f"crash{it}.db"
        record, again = tmp_path / f"crash{it}.log", tmp_path / f"crash{it}-restart.log"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(record), publishing],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.stderr else ""
        time.sleep(rng.uniform(0.01, 0.3))  # sleep-ok: the random moment of the kill
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        if child.stderr:
            child.stderr.close()
        done = _done(db)
        before_kill = _records(record)
        delivered = {(sub, pos) for sub, pos, _ in before_kill}
        recorded_undelivered = sorted(done - delivered)
        assert not recorded_undelivered, (
            f"iteration {it}: recorded as done but never delivered: {recorded_undelivered[:10]}"
        )

        restart = subprocess.run(
            [sys.executable, "-c", CHILD, str(db), str(again), "recover"],
            capture_output=True, text=True, timeout=120,
        )
        assert restart.returncode == 0, restart.stderr[-2000:]
        assert "drained" in restart.stdout
        after_restart = _records(again) if again.exists() else []
        done_again = sorted({(sub, pos) for sub, pos, _ in after_restart} & done)
        assert not done_again, (
            f"iteration {it}: {len(done_again)} deliveries recorded as done were delivered again "
            f"after the restart: {done_again[:10]}"
        )

        committed = asyncio.run(_committed(db))
        records = before_kill + after_restart
        for sub in ("audit", "billing"):
            seen = [(pos, key) for s, pos, key in records if s == sub]
            positions = {pos for pos, _ in seen}
            lost = [pos for pos, _ in committed if pos not in positions]
            assert not lost, f"iteration {it}: {sub} lost {len(lost)} committed events: {lost[:10]}"
            total_repeats += len(seen) - len(positions)
            first: dict[int, int] = {}
            for i, (pos, _) in enumerate(seen):
                first.setdefault(pos, i)
            keyed = {}
            for pos, key in committed:
                keyed.setdefault(key, []).append(first[pos])
            for key, order in keyed.items():
                assert order == sorted(order), f"iteration {it}: {sub} handled {key} out of order"
        total_events += len(committed)
        total_deliveries += len(records)
        total_done += len(done)
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), record, again):
            if f.exists():
                os.remove(f)
    assert total_events > 0 and total_done > 0
    share = total_repeats / total_deliveries
    print(
        f"\n{ITERATIONS} kills: {total_events} committed events, 0 lost, {total_deliveries} "
        f"deliveries, {total_repeats} repeated ({share:.2%}), {total_done} recorded as done "
        "before a kill, none delivered again"
    )
    assert share <= MAX_REPEAT_SHARE, (
        f"{total_repeats} of {total_deliveries} deliveries repeated ({share:.2%}, limit "
        f"{MAX_REPEAT_SHARE:.0%}): the restart replays more than the unrecorded tail"
    )
