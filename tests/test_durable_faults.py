"""The durable log under faults and bad input (issue 11: items 3, 5, 6, 8 and the storage parts
of 9). Every test here failed before the change it guards."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from oxbus import SqliteEventStore
from oxbus.errors import ConcurrencyError


# ------------------------------------------------------------ item 8: loops and threads


def test_a_store_shared_by_two_event_loops_completes_every_await(tmp_path: Path) -> None:
    # The case: one stream, both appends expecting the same version (one conflicts).
    store = SqliteEventStore(str(tmp_path / "shared.db"))
    hung: list[int] = []
    errors: list[BaseException] = []
    try:
        for rnd in range(400):
            def append(i: int, rnd: int = rnd) -> None:
                try:
                    asyncio.run(store.append("s", [{"event_type": "T", "i": i}], expected_version=rnd))
                except ConcurrencyError:
                    pass  # the other thread appended first: decided, and reported
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=append, args=(i,), daemon=True) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
            if any(t.is_alive() for t in threads):
                hung.append(rnd)
                break
        assert not hung, f"round {hung[0]}: an await on a shared store never returned"
        assert not errors, errors[:3]
    finally:
        store.close()


# ---------------------------------------- item 3: a second SQLite copy in the bus's process

SAME_PROCESS = textwrap.dedent(
    """
    import asyncio, sys
    from oxbus import EventBus
    from oxbus.errors import StorageError

    db, mode = sys.argv[1], sys.argv[2]

    async def main():
        bus = EventBus(store=db)
        bus.subscribe("T", lambda e: None, name="sink")
        async with bus:
            for i in range(5):
                await bus.publish({"event_type": "T", "event_id": f"e{i}"})
            if mode == "sqlite3":
                import sqlite3  # the user's own look at the file, in the bus's process
                conn = sqlite3.connect(db)
                conn.execute("SELECT COUNT(*) FROM events").fetchone()
                conn.close()
            elif mode == "read_flow":
                import oxbus.flow
                oxbus.flow.read_flow(db)
            elif mode == "cli":
                from oxbus.cli import main as cli
                for args in (["events", db], ["stats", db], ["dlq", db, "list"], ["flow", db]):
                    try:
                        cli(args)
                    except SystemExit:
                        pass
            # Then a look from another process, which must not take the bus for gone.
            import subprocess
            subprocess.run([sys.executable, "-m", "oxbus", "events", db], capture_output=True, timeout=60)
            for i in range(5, 505):
                try:
                    await bus.publish({"event_type": "T", "event_id": f"e{i}"})
                except StorageError as e:
                    print("refused", str(e).replace("\\n", " "), flush=True)
                    break
                print("ack", f"e{i}", flush=True)
            print("done", flush=True)
            await asyncio.sleep(3600)  # sleep-ok: waits for the SIGKILL

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("mode", ["sqlite3", "read_flow", "cli"])
def test_a_second_sqlite_in_the_bus_process_loses_no_acknowledged_event(
    tmp_path: Path, mode: str
) -> None:
    db = tmp_path / "same.db"
    child = subprocess.Popen(
        [sys.executable, "-c", SAME_PROCESS, str(db), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    acked = {f"e{i}" for i in range(5)}
    refused = None
    try:
        assert child.stdout is not None
        for line in child.stdout:
            word, _, rest = line.strip().partition(" ")
            if word == "ack":
                acked.add(rest)
            elif word == "refused":
                refused = rest
            elif word == "done":
                break
        else:
            pytest.fail(f"the child ended early: {child.stderr.read() if child.stderr else ''}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
    stored = asyncio.run(_ids(db))
    lost = sorted(acked - stored, key=lambda s: int(s[1:]))
    assert not lost, f"{len(lost)} of {len(acked)} acknowledged events lost: {lost[:5]}"
    if mode == "sqlite3":
        # The bus saw the foreign SQLite remove its WAL: refused, naming the cause.
        assert refused is not None and "sqlite3" in refused, refused
    else:
        # oxbus's own readers never open a second SQLite: nothing to refuse.
        assert refused is None, refused
        assert len(acked) == 505


async def _ids(db: Path) -> set[str]:
    async with SqliteEventStore(str(db)) as store:
        return {e.event_id async for e in store.replay()}
