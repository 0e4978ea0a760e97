"""A durable bus running sagas, killed with SIGKILL at random moments, loses no instance and
applies no step twice (issue 16).

Each iteration runs a publisher process on a fresh SQLite file: it publishes orders, each as
four events (placed, paid, reserved, shipped) that drive one saga instance through four steps,
each step publishing one command. It is killed with SIGKILL after a random delay, then a bus
on the same file is started in another process and drained. Afterwards, for every order whose
events were committed:

- its instance exists, has applied exactly the committed events, each once, in order (its
  state lists them; ``saga_applied`` counts them), and is completed once "shipped" was
  committed;
- each step's command is in the log exactly once (a step whose change was committed is not
  applied again; one whose change was not is applied after the restart).

Step bodies append to a record file with one unbuffered ``os.write`` (it survives the kill):
a body may run again after a kill (its change was not committed), never its effects.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    import oxbus
    from oxbus import DomainEvent, EventBus

    db, record, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    class CkEvent(DomainEvent):
        def __init__(self, order_id):
            super().__init__()
            self.order_id = order_id

        @property
        def aggregate_id(self):
            return self.order_id

    class CkPlaced(CkEvent): ...
    class CkPaid(CkEvent): ...
    class CkReserved(CkEvent): ...
    class CkShipped(CkEvent): ...
    class CkCharge(CkEvent): ...
    class CkReserve(CkEvent): ...
    class CkShip(CkEvent): ...
    class CkCancel(CkEvent): ...
    class CkTimedOut(CkEvent): ...

    class CkSaga(oxbus.Saga):
        key = "order_id"

        def ran(self, step):
            os.write(fd, f"{step} {self.saga_id}\\n".encode())
            self.state.setdefault("applied", []).append(step)

        @oxbus.step(CkPlaced, starts=True)
        async def placed(self, e):
            self.ran("placed")
            await self.publish(CkCharge(e.order_id))
            self.on_failure(CkCancel(e.order_id))
            self.deadline(3600, CkTimedOut(e.order_id))

        @oxbus.step(CkPaid)
        async def paid(self, e):
            self.ran("paid")
            self.cancel_deadline(CkTimedOut)
            await asyncio.sleep(0)  # sleep-ok: a real suspension inside the step
            await self.publish(CkReserve(e.order_id))

        @oxbus.step(CkReserved)
        async def reserved(self, e):
            self.ran("reserved")
            await self.publish(CkShip(e.order_id))

        @oxbus.step(CkShipped)
        async def shipped(self, e):
            self.ran("shipped")
            self.complete()

        @oxbus.step(CkTimedOut)
        async def timed_out(self, e):
            await self.compensate()

    async def main():
        bus = EventBus(store=db, workers=4)
        bus.register_saga(CkSaga)
        async with bus:
            await bus.drain()
            if mode == "publish":
                print("ready", flush=True)
                n = 0
                while True:
                    orders = [f"o{n + i}" for i in range(8)]
                    n += 8
                    for kind in (CkPlaced, CkPaid, CkReserved, CkShipped):
                        await bus.publish_many([kind(o) for o in orders])
        print("drained", flush=True)

    asyncio.run(main())
    """
)

ITERATIONS = 20
STEPS = ("placed", "paid", "reserved", "shipped")
INPUTS = dict(zip(("CkPlaced", "CkPaid", "CkReserved", "CkShipped"), STEPS))
COMMANDS = dict(zip(("CkCharge", "CkReserve", "CkShip"), STEPS))


def _rows(db: Path, query: str) -> list[tuple[object, ...]]:
    con = sqlite3.connect(db)
    try:
        return list(con.execute(query))
    finally:
        con.close()


def _key(metadata_and_data: str) -> str:
    return str(json.loads(metadata_and_data)["order_id"])


@pytest.mark.timeout(900)
def test_a_saga_bus_killed_at_random_moments_loses_no_instance_and_applies_no_step_twice(
    tmp_path: Path,
) -> None:
    rng = random.Random(int(os.environ.get("OXBUS_CRASH_SEED", "20261205")))
    totals: Counter[str] = Counter()
    for it in range(ITERATIONS):
        db, record = tmp_path / f"saga{it}.db", tmp_path / f"saga{it}.log"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db), str(record), "publish"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        line = child.stdout.readline().strip()
        assert line == "ready", (line, child.stderr.read() if child.stderr else "")
        time.sleep(rng.uniform(0.02, 0.4))  # sleep-ok: the random moment of the kill
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        if child.stderr:
            child.stderr.close()
        killed_applied = _rows(db, "SELECT COUNT(*) FROM saga_applied")[0][0]

        restart = subprocess.run(
            [sys.executable, "-c", CHILD, str(db), str(record), "recover"],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert restart.returncode == 0, restart.stderr[-3000:]
        assert "drained" in restart.stdout

        committed: dict[str, list[str]] = {}
        commands: Counter[tuple[str, str]] = Counter()
        for event_type, data in _rows(db, "SELECT event_type, data FROM events ORDER BY position"):
            if event_type in INPUTS:
                committed.setdefault(_key(str(data)), []).append(INPUTS[str(event_type)])
            elif event_type in COMMANDS:
                commands[(_key(str(data)), COMMANDS[str(event_type)])] += 1
        instances = {
            str(k): (str(status), json.loads(str(state))["applied"], int(steps))  # type: ignore[arg-type]
            for k, status, state, steps in _rows(
                db, "SELECT key, status, state, steps FROM saga_instances"
            )
        }
        applied = Counter(str(k) for (k,) in _rows(db, "SELECT key FROM saga_applied"))
        lost = sorted(set(committed) - set(instances))
        assert not lost, f"iteration {it}: instances lost: {lost[:10]}"
        for key, inputs in committed.items():
            status, steps_applied, steps = instances[key]
            assert steps_applied == inputs, (
                f"iteration {it}: {key} applied {steps_applied}, committed {inputs}"
            )
            assert steps == applied[key] == len(inputs), (it, key, steps, applied[key])
            assert status == ("completed" if "shipped" in inputs else "running"), (it, key, status)
            for step in inputs:
                if step != "shipped":  # the last step publishes no command
                    assert commands[(key, step)] == 1, (
                        f"iteration {it}: the command of {key}'s step {step} is in the log "
                        f"{commands[(key, step)]} times"
                    )
        extra = set(commands) - {(k, s) for k, ins in committed.items() for s in ins}
        assert not extra, f"iteration {it}: commands of steps never applied: {sorted(extra)[:5]}"
        runs = Counter(tuple(line.split()) for line in record.read_text().splitlines())
        totals["orders"] += len(committed)
        totals["applications"] += sum(len(v) for v in committed.values())
        totals["body runs"] += sum(runs.values())
        totals["applied before the kill"] += killed_applied
        for f in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), record):
            if f.exists():
                os.remove(f)
    assert totals["orders"] > 0 and totals["applied before the kill"] > 0
    print(
        f"\n{ITERATIONS} kills: {totals['orders']} instances, {totals['applications']} steps "
        f"applied once each ({totals['applied before the kill']} before a kill), "
        f"{totals['body runs']} step bodies run"
    )
