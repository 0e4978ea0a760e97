"""The durable log under faults and bad input (issue 11: items 3, 5, 6, 8 and the storage parts
of 9). Every test here failed before the change it guards."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from _env import unavailable
from oxbus import DomainEvent, EventBus, SqliteEventStore
from oxbus.cli import main as cli
from oxbus.flow import LogReader
from oxbus.errors import (
    BusClosed,
    BusNotStarted,
    ConcurrencyError,
    ConfigurationError,
    StorageError,
    UndecodableEvent,
)


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


# ------------------------------------------------------------ item 6: a bad row in the log


@dataclass
class Good(DomainEvent):
    n: int = 0


@dataclass
class Shape(DomainEvent):
    sku: str
    qty: int


async def _bad_rows(db: Path) -> dict[str, int]:
    """Writes good events and four rows nothing can decode, before any bus opens the file
    (sqlite3 here is safe: no oxbus connection is open); returns position by kind."""
    async with SqliteEventStore(str(db)) as store:
        await store.append("good", [Good(1), Good(2)], expected_version=0)
    rows = {
        "json": ("FaultBad", '{"n": 1', "{}", None),
        "date": ("FaultBad", '{"n": 2}', "{}", "not a date"),
        "digits": ("FaultBad", '{"n": ' + "9" * 100_000 + "}", "{}", None),
        "shape": ("Shape", '{"colour": "red"}', "{}", None),
    }
    out = {}
    with closing(sqlite3.connect(db)) as conn, conn:
        for i, (kind, (etype, data, meta, occurred)) in enumerate(rows.items()):
            cur = conn.execute(
                "INSERT INTO events (stream_id, version, event_type, event_version, event_id, data,"
                " metadata, occurred_at, recorded_at) VALUES (?, 1, ?, 1, ?, ?, ?, ?, ?)",
                (f"bad-{kind}", etype, f"bad-{i}", data, meta, occurred, "2026-01-01T00:00:00+00:00"),
            )
            out[kind] = cur.lastrowid
        conn.execute(
            "INSERT INTO events (stream_id, version, event_type, event_version, event_id, data,"
            " metadata, occurred_at, recorded_at) VALUES ('good', 3, 'Good', 1, 'g3',"
            " '{\"n\": 3}', '{}', NULL, '2026-01-01T00:00:00+00:00')"
        )
    return out


async def test_a_bad_row_is_a_dead_letter_of_the_subscriptions_it_matches_and_blocks_none(
    tmp_path: Path,
) -> None:
    db = tmp_path / "bad.db"
    bad = await _bad_rows(db)
    good: list[int] = []
    taken: list[object] = []
    bus = EventBus(store=str(db))
    bus.subscribe(Good, lambda e: good.append(e.n), name="good", from_beginning=True)
    bus.subscribe("FaultBad", taken.append, name="bad", from_beginning=True)
    bus.subscribe(Shape, taken.append, name="shape", from_beginning=True)
    async with bus:
        await bus.drain(timeout=10)
        assert sorted(good) == [1, 2, 3]
        assert taken == []
        dead = {(d.subscription, d.position): d for d in bus.dead_letters.list()}
        assert set(dead) == {
            ("bad", bad["json"]), ("bad", bad["date"]), ("bad", bad["digits"]),
            ("shape", bad["shape"]),
        }
        for (_, position), d in dead.items():
            assert d.error_type == "oxbus.errors.UndecodableEvent"
            assert f"position {position}" in d.error_message
        assert "Shape refuses its data" in dead[("shape", bad["shape"])].error_message
    # Recorded: the next start neither trips on them nor dead-letters them twice.
    bus2 = EventBus(store=str(db))
    bus2.subscribe(Good, lambda e: good.append(e.n), name="good", from_beginning=True)
    bus2.subscribe("FaultBad", taken.append, name="bad", from_beginning=True)
    async with bus2:
        await bus2.drain(timeout=10)
        assert len(bus2.dead_letters) == 4  # the same four, none added
    assert sorted(good) == [1, 2, 3]


async def test_read_all_names_the_position_of_a_row_it_cannot_decode(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    bad = await _bad_rows(db)
    async with SqliteEventStore(str(db)) as store:
        with pytest.raises(UndecodableEvent) as info:
            await store.read_all()
        assert info.value.position == bad["json"]
        assert f"position {bad['json']} (FaultBad)" in str(info.value)
        assert isinstance(info.value, ValueError)  # what read_all raised before


def test_the_cli_shows_a_row_it_cannot_decode_as_undecodable(tmp_path: Path) -> None:
    db = tmp_path / "bad.db"
    bad = asyncio.run(_bad_rows(db))
    runner = CliRunner()
    out = runner.invoke(cli, ["events", str(db)])
    assert out.exit_code == 0, out.output
    assert f"{bad['json']:>6}" in out.output and "(undecodable: " in out.output
    assert "Traceback" not in out.output
    out = runner.invoke(cli, ["events", "--json", str(db)])
    lines = [json.loads(line) for line in out.output.splitlines()]
    assert {x["position"] for x in lines if "undecodable" in x} == set(bad.values()) - {bad["shape"]}
    out = runner.invoke(cli, ["flow", str(db)])
    assert out.exit_code == 0, out.output
    assert "cannot be decoded" in out.output


async def test_a_failed_start_leaves_the_bus_stopped(tmp_path: Path) -> None:
    store = SqliteEventStore(str(tmp_path / "closed.db"))
    store.close()
    bus = EventBus(store=store)
    bus.subscribe("T", lambda e: None, name="sub")
    with pytest.raises(StorageError):
        await bus.start()
    assert not bus.is_running
    with pytest.raises((BusClosed, BusNotStarted)):
        await bus.publish({"event_type": "T"})


# ------------------------------------------------------------ item 9: the storage parts


def test_an_empty_store_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="got ''"):
        EventBus(store="")
    with pytest.raises(ConfigurationError, match="got ''"):
        SqliteEventStore("")


def test_a_foreign_progress_table_is_never_dropped(tmp_path: Path) -> None:
    db = tmp_path / "theirs.db"
    with closing(sqlite3.connect(db)) as conn, conn:
        # Columns an old oxbus progress table had, and one more: not oxbus's.
        conn.execute("CREATE TABLE progress (subscription TEXT, position INTEGER, percent REAL)")
        conn.execute("INSERT INTO progress VALUES ('backup', 7, 42.0)")
    with pytest.raises(StorageError, match='table named "progress"'):
        SqliteEventStore(str(db))
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT * FROM progress").fetchall() == [("backup", 7, 42.0)]


READ_ONLY_CLI = """
import os, sys
import click._termui_impl, oxbus.flow, oxbus.store, oxbus.registry  # imported before the drop
from oxbus.cli import main
db = sys.argv[1]
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)  # nobody: file permissions now apply
for args in (["events", db], ["stats", db], ["dlq", db, "list"], ["flow", db], ["replay", db, "--to", "builtins:print"]):
    try:
        main(args)
    except SystemExit as e:
        print("EXIT", args[0], e.code, flush=True)
"""


def test_the_cli_reads_a_log_in_a_read_only_directory(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="oxbus-ro-cli-"))
    db = base / "ro.db"
    try:
        async def write() -> None:
            async with SqliteEventStore(str(db)) as store:
                await store.append("s", [{"event_type": "T", "n": 1}], expected_version=0)

        asyncio.run(write())
        for f in base.iterdir():
            f.chmod(0o444)
        base.chmod(0o555)
        if os.geteuid() == 0:
            probe = subprocess.run(
                [sys.executable, "-c", "import os; os.setuid(65534); print('ok')"],
                capture_output=True, text=True, timeout=60,
            )
            if probe.returncode != 0:
                unavailable(f"running as root and cannot drop privileges: {probe.stderr[-300:]}")
        p = subprocess.run(
            [sys.executable, "-c", READ_ONLY_CLI, str(db)], capture_output=True, text=True, timeout=120,
        )
        assert "Traceback" not in p.stderr, p.stderr[-3000:]
        for cmd in ("events", "stats", "dlq", "flow", "replay"):
            assert f"EXIT {cmd} 0" in p.stdout, p.stdout + p.stderr[-2000:]
        assert sorted(f.name for f in base.iterdir()) == ["ro.db"], "nothing written beside it"
    finally:
        base.chmod(0o755)
        shutil.rmtree(base)


# ------------------------------------------------------ item 5: progress stays per subscription


async def test_interleaved_types_keep_progress_one_range_per_subscription(tmp_path: Path) -> None:
    db = tmp_path / "interleaved.db"
    n = 200_000
    seen = {"A": 0, "B": 0, "C": 0}

    def count(kind: str) -> Callable[[object], None]:
        def handler(_: object) -> None:
            seen[kind] += 1
        return handler

    bus = EventBus(store=str(db))
    for kind in seen:
        bus.subscribe(kind, count(kind), name=f"takes-{kind}")
    async with bus:
        for start in range(0, n, 2000):
            await bus.publish_many(
                [{"event_type": "ABC"[i % 3], "i": i} for i in range(start, start + 2000)]
            )
        await bus.drain(timeout=120)
    assert sum(seen.values()) == n
    with LogReader(db) as log:
        ((ranges,),) = log.query("SELECT COUNT(*) FROM progress_ranges")
        delivered = dict(log.query("SELECT subscription, COUNT(*) FROM progress GROUP BY 1"))
        ((pairs,),) = log.query("SELECT COUNT(*) FROM skipped_types")
    # One run of finished positions per subscription (was one row per delivery: ~200,000).
    assert ranges <= 2 * len(seen), ranges
    # The progress view still lists what each subscription handled, not what it skipped.
    assert delivered == {f"takes-{k}": v for k, v in seen.items()}
    assert pairs == 6
    # A restart has nothing to deliver, and reads nothing to find that out.
    async with SqliteEventStore(str(db)) as store:
        for kind in seen:
            start_after = await store._core.register_subscription(f"takes-{kind}", False)
            assert await store._core.undelivered(f"takes-{kind}", start_after) == []
