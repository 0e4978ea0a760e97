"""The ``oxbus`` command line (issue 6), against logs written by a durable bus in the test:
every subcommand, its ``--help``, its ``--json`` output parsed back, and its exit codes
(0 done, 1 negative answer, 2 usage error, 3 DB or URL unreachable). The ``--json`` contract
itself (both places, the shapes, errors as JSON) is tested in test_cli_json.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click._termui_impl
import pytest
from _cli import (
    HealthHandler,
    Note,
    OrderPlaced,
    PaymentTaken,
    health_endpoint,
    run,
    run_json,
    run_lines,
    subscribe_pipeline,
    write_log,
)
from _env import unavailable
from oxbus import EventBus, SqliteEventStore


@pytest.fixture
async def db(tmp_path: Path) -> str:
    path = str(tmp_path / "log.db")
    await write_log(path)
    return path


# ------------------------------------------------------------------------------- help


COMMANDS = [
    [],
    ["demo"],
    ["events"],
    ["dlq"],
    ["dlq", "x.db", "list"],
    ["dlq", "x.db", "show"],
    ["dlq", "x.db", "retry"],
    ["dlq", "x.db", "purge"],
    ["replay"],
    ["health"],
    ["stats"],
    ["flow"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "oxbus")
def test_every_command_has_help(cmd: list[str]) -> None:
    r = run(*cmd, "--help")
    assert r.exit_code == 0
    assert r.stdout.startswith("Usage: ")
    assert "--json" in r.stdout  # the group's and every command's
    if not cmd:
        assert "Exit codes" in r.stdout


def test_python_dash_m_and_the_console_script() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "oxbus", "--help"], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0 and "Usage: oxbus" in p.stdout, p.stderr
    script = Path(sys.executable).parent / "oxbus"
    if not script.exists():
        unavailable("oxbus is not installed as a console script in this environment")
    p = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "oxbus" in p.stdout


# -------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize(
    "args",
    [
        ["nope"],
        ["events", "x.db", "--bogus"],
        ["events", "x.db", "--limit", "0"],
        ["flow", "x.db", "--format", "gif"],
        ["dlq", "x.db"],
        ["dlq", "x.db", "show"],
        ["dlq", "x.db", "nope"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    assert run(*args).exit_code == 2


@pytest.mark.parametrize(
    "cmd",
    [
        ["events"],
        ["stats"],
        ["dlq", "DB", "list"],
        ["dlq", "DB", "show", "1"],
        ["dlq", "DB", "retry", "--all"],
        ["dlq", "DB", "purge", "--yes"],
        ["flow"],
        ["replay", "DB", "--to", "os:getcwd"],
    ],
)
def test_a_missing_or_foreign_db_exits_3_and_is_not_created(tmp_path: Path, cmd: list[str]) -> None:
    missing = tmp_path / "missing.db"
    foreign = tmp_path / "other.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    for path in (missing, foreign):
        args = [str(path) if a == "DB" else a for a in cmd]
        if "DB" not in cmd:
            args.append(str(path))
        r = run(*args)
        assert r.exit_code == 3, (r.stdout, r.stderr)
        assert str(path.name) in r.stderr
    assert not missing.exists()
    with sqlite3.connect(foreign) as conn:  # nothing was added to someone else's database
        assert [n for (n,) in conn.execute("SELECT name FROM sqlite_master")] == ["t"]
    conn.close()


# ------------------------------------------------------------------------------ events


def test_events_lists_the_log_in_order(db: str) -> None:
    r = run("events", db)
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert len(lines) == 10  # 5 orders, 4 payments, 1 note
    assert sum("OrderPlaced" in ln for ln in lines) == 5
    assert '"order_id": "o-0"' in lines[0] and "$bus:o-0@1" in lines[0]


def test_events_json_lines_and_filters(db: str) -> None:
    r = run("events", db, "--json")
    assert r.exit_code == 0
    rows = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [e["position"] for e in rows] == sorted(e["position"] for e in rows)
    assert {
        "position",
        "stream_id",
        "version",
        "event_type",
        "event_id",
        "data",
        "metadata",
        "correlation_id",
        "causation_id",
        "recorded_at",
    } <= set(rows[0])
    payments = [e for e in rows if e["event_type"] == "PaymentTaken"]
    parents = {e["event_id"]: e for e in rows}
    assert all(parents[p["causation_id"]]["event_type"] == "OrderPlaced" for p in payments)
    assert all(p["metadata"]["subscription"] == "cli_pay" for p in payments)

    only = [
        json.loads(ln)
        for ln in run("events", db, "--type", "PaymentTaken", "--json").stdout.splitlines()
    ]
    assert only == payments
    stream = [
        json.loads(ln)
        for ln in run("events", db, "--stream", "$bus:o-1", "--json").stdout.splitlines()
    ]
    assert [e["event_type"] for e in stream] == ["OrderPlaced", "PaymentTaken"]
    after = [
        json.loads(ln) for ln in run("events", db, "--after", "7", "--json").stdout.splitlines()
    ]
    assert [e["position"] for e in after] == [8, 9, 10]
    limited = run("events", db, "--limit", "2", "--json").stdout.splitlines()
    assert len(limited) == 2


def test_events_that_match_nothing_exit_1(db: str) -> None:
    r = run("events", db, "--type", "NoSuchType")
    assert r.exit_code == 1
    assert r.stdout == ""
    assert run("events", db, "--after", "1000", "--json").exit_code == 1


def test_events_follow_prints_new_rows_as_they_are_committed(db: str) -> None:
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "oxbus",
            "--json",  # before the subcommand: the same JSON Lines
            "events",
            db,
            "--type",
            "Note",
            "--follow",
            "--limit",
            "3",
            "--interval",
            "0.05",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        first = json.loads(p.stdout.readline())  # the note already in the log
        assert first["data"] == {"text": "hello"}

        async def append() -> None:
            async with SqliteEventStore(db) as store:
                await store.append("notes", [Note("two")], expected_version=0)
                await store.append("notes", [Note("three")], expected_version=1)

        asyncio.run(append())
        out, err = p.communicate(timeout=60)  # --limit 3 ends it
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert [json.loads(ln)["data"]["text"] for ln in out.splitlines()] == ["two", "three"]


def test_events_follow_ends_with_ctrl_c_and_exit_0(db: str) -> None:
    p = subprocess.Popen(
        [sys.executable, "-m", "oxbus", "events", db, "--follow", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        assert "OrderPlaced" in p.stdout.readline()  # it is running and has listed the log
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------------- dlq


def test_dlq_list_and_show(db: str) -> None:
    entries = run_lines("dlq", db, "list")
    assert len(entries) == 1
    (d,) = entries
    assert d["subscription"] == "cli_pay" and d["event_type"] == "OrderPlaced"
    assert d["error_type"] == "ConnectionError" and "o-3" in d["error_message"]
    assert d["data"] == {"order_id": "o-3", "amount": 13.0} and d["attempts"] == 1

    text = run("dlq", db, "list")
    assert text.exit_code == 0 and "cli_pay" in text.stdout and "ConnectionError" in text.stdout

    shown = run_json("dlq", db, "show", str(d["id"]))
    assert shown["id"] == d["id"] and "ConnectionError" in shown["traceback"]
    assert run_json("dlq", db, "show", f"db-{d['id']}") == shown  # bus.dead_letters' id form
    text = run("dlq", db, "show", str(d["id"]))
    assert text.exit_code == 0 and "traceback:" in text.stdout and "o-3" in text.stdout

    assert run("dlq", db, "show", "999").exit_code == 1
    assert run("dlq", db, "show", "abc").exit_code == 2


async def test_dlq_retry_redelivers_at_the_next_start_to_that_subscription_only(db: str) -> None:
    (d,) = run_lines("dlq", db, "list")
    assert run("dlq", db, "retry").exit_code == 2  # ids or --all
    assert run("dlq", db, "retry", "999").exit_code == 1
    assert run_lines("dlq", db, "list") == [d]  # a failed retry changes nothing

    assert run_json("dlq", db, "retry", str(d["id"])) == {"retried": 1, "ids": [d["id"]]}
    assert run_lines("dlq", db, "list") == []

    seen: list[Any] = []
    bus = EventBus(store=db)
    subscribe_pipeline(bus, fail_on=None, seen=seen)
    async with bus:
        await bus.drain(timeout=10)
        assert [e.order_id for e in seen] == ["o-3"]  # only the dead letter, only to cli_pay
        assert len(bus.dead_letters) == 0
    payments = [
        json.loads(ln)
        for ln in run("events", db, "--type", "PaymentTaken", "--json").stdout.splitlines()
    ]
    assert sorted(e["data"]["order_id"] for e in payments) == ["o-0", "o-1", "o-2", "o-3", "o-4"]


def test_dlq_retry_all(db: str) -> None:
    assert run_json("dlq", db, "retry", "--all")["retried"] == 1
    assert run_json("dlq", db, "retry", "--all")["retried"] == 0
    with sqlite3.connect(db) as conn:  # the finished-record of the pair is gone, others stay
        subs = dict(conn.execute("SELECT subscription, COUNT(*) FROM progress GROUP BY 1"))
    conn.close()
    assert subs == {"cli_pay": 4, "cli_mail": 4}


def test_dlq_purge_asks_unless_yes(db: str) -> None:
    r = run("dlq", db, "purge", input="n\n")
    assert r.exit_code == 1
    assert len(run_lines("dlq", db, "list")) == 1
    r = run("dlq", db, "purge", input="y\n")
    assert r.exit_code == 0 and "purged 1 dead letter" in r.stdout
    assert run_json("dlq", db, "purge", "--yes") == {"purged": 0}
    assert run_lines("dlq", db, "list") == []


# ------------------------------------------------------------------------------ replay


@pytest.fixture
def handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable module of replay handlers; yields its name."""
    name = f"cli_handlers_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent("""
        import asyncio
        seen = []

        def sync_handler(event):
            seen.append(event)

        async def async_handler(event):
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            seen.append(event)

        def picky(event):
            if type(event).__name__ == "OrderPlaced" and event.order_id in ("o-1", "o-2"):
                raise ValueError("no " + event.order_id)
            seen.append(event)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_replay_calls_a_sync_handler_with_rebuilt_events(db: str, handlers: str) -> None:
    r = run("replay", db, "--to", f"{handlers}:sync_handler")
    assert r.exit_code == 0, r.stderr
    assert "replayed 10 events" in r.stdout and "10 succeeded, 0 raised" in r.stdout
    assert "replaying" in r.stderr  # the progress bar's label
    seen = sys.modules[handlers].seen
    assert [type(e).__name__ for e in seen].count("OrderPlaced") == 5
    first = seen[0]
    assert isinstance(first, OrderPlaced) and first.order_id == "o-0" and first.amount == 10.0


def test_replay_awaits_an_async_handler_and_filters(db: str, handlers: str) -> None:
    report = run_json(
        "replay", db, "--to", f"{handlers}:async_handler", "--type", "PaymentTaken"
    )
    assert report["events"] == 4 and report["succeeded"] == 4 and report["failed"] == 0
    seen = sys.modules[handlers].seen
    assert all(isinstance(e, PaymentTaken) for e in seen) and len(seen) == 4
    report = run_json("replay", db, "--to", f"{handlers}:async_handler", "--after", "8")
    assert report["events"] == 2


def test_replay_counts_raising_calls_and_exits_1(db: str, handlers: str) -> None:
    r = run("replay", db, "--to", f"{handlers}:picky", "--json")
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["events"] == 10 and report["failed"] == 2 and report["succeeded"] == 8
    assert {e["error_message"] for e in report["errors"]} == {"no o-1", "no o-2"}
    assert all(e["error_type"] == "ValueError" for e in report["errors"])
    text = run("replay", db, "--to", f"{handlers}:picky")
    assert text.exit_code == 1 and "2 raised" in text.stdout and "no o-1" in text.stderr


def test_replay_redraws_its_progress_bar_a_few_times_a_second_not_per_event(
    tmp_path: Path, handlers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, n = str(tmp_path / "many.db"), 3000

    async def write() -> None:
        async with SqliteEventStore(path) as store:
            ticks = [{"event_type": "CliTick", "n": i} for i in range(n)]
            await store.append("ticks", ticks, expected_version=0)

    asyncio.run(write())
    monkeypatch.setattr(click._termui_impl, "isatty", lambda _file: True)  # draw as on a tty
    r = run("replay", path, "--to", f"{handlers}:sync_handler")
    assert r.exit_code == 0, r.stderr
    assert len(sys.modules[handlers].seen) == n
    assert f"{n}/{n}" in r.stderr  # the bar ends full
    redraws = r.stderr.count("\r")  # each redraw starts over the line
    assert 2 <= redraws < n // 30, redraws  # drawn per event, it would be about n


@pytest.mark.parametrize(
    "target", ["no_colon", "no_such_module_xyz:h", "os:no_such_attr", "os:sep"]
)
def test_replay_target_that_cannot_be_used_exits_2(db: str, target: str) -> None:
    r = run("replay", db, "--to", target)
    assert r.exit_code == 2
    assert "--to" in r.stderr


# ------------------------------------------------------------------------------ health


@pytest.fixture
def health_server() -> Iterator[tuple[str, type[HealthHandler]]]:
    with health_endpoint() as endpoint:
        yield endpoint


def test_health_exit_codes_follow_the_status(
    health_server: tuple[str, type[HealthHandler]],
) -> None:
    url, handler = health_server
    handler.body = json.dumps({"status": "healthy", "queue_size": 0, "reasons": []}).encode()
    r = run("health", url)
    assert r.exit_code == 0 and "healthy" in r.stdout
    assert run_json("health", url + "/")["queue_size"] == 0
    assert run("health", url.removeprefix("http://")).exit_code == 0  # host:port
    assert run("health", url + "/health").exit_code == 0

    handler.body = json.dumps({"status": "degraded", "reasons": ["queue 90% full"]}).encode()
    r = run("health", url, "--json")
    assert r.exit_code == 1 and json.loads(r.stdout)["reasons"] == ["queue 90% full"]
    handler.status = 503  # a server may answer unhealthy with 503 and the JSON
    handler.body = json.dumps({"status": "stopped"}).encode()
    assert run("health", url).exit_code == 1

    handler.status, handler.body = 200, b"<html>not health</html>"
    assert run("health", url).exit_code == 3


def test_health_of_nothing_listening_exits_3() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    r = run("health", f"127.0.0.1:{port}", "--timeout", "5")
    assert r.exit_code == 3 and "unreachable" in r.stderr


async def test_health_of_a_running_bus_through_oxbus_metrics() -> None:
    import oxbus.metrics as metrics  # prometheus_client is a dependency: no skip

    bus = EventBus()
    async with bus:
        server = await metrics.serve(bus, port=0, host="127.0.0.1")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "oxbus",
                "health",
                server.url,
                "--json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await server.close()
    assert proc.returncode == 0, err
    assert json.loads(out)["status"] == "healthy"


# ------------------------------------------------------------------------------- stats


def test_stats(db: str) -> None:
    s = run_json("stats", db)
    assert s["events"] == 10 and s["positions"] == {"first": 1, "last": 10}
    assert s["by_event_type"] == {"OrderPlaced": 5, "PaymentTaken": 4, "Note": 1}
    assert s["streams"] == 6 and s["by_stream"]["$bus:o-0"] == 2 and s["by_stream"]["$bus"] == 1
    assert s["dead_letters"] == {
        "total": 1,
        "by_subscription": {"cli_pay": 1},
        "by_error_type": {"ConnectionError": 1},
    }
    subs = {x["name"]: x for x in s["subscriptions"]}
    assert subs["cli_pay"]["delivered"] == 5 and subs["cli_pay"]["dead_letters"] == 1
    assert subs["cli_mail"]["delivered"] == 4 and subs["cli_mail"]["dead_letters"] == 0
    assert len(run_json("stats", db, "--top", "2")["by_stream"]) == 2
    text = run("stats", db)
    assert text.exit_code == 0
    assert "10 events in 6 streams" in text.stdout and "cli_pay" in text.stdout


def test_stats_of_an_empty_log(tmp_path: Path) -> None:
    path = str(tmp_path / "empty.db")
    SqliteEventStore(path).close()
    s = run_json("stats", path)
    assert s["events"] == 0 and s["subscriptions"] == [] and s["dead_letters"]["total"] == 0
    assert run("stats", path).exit_code == 0


# -------------------------------------------------------------------------------- demo


@pytest.mark.timeout(300)
def test_demo_runs_and_writes_a_durable_log(tmp_path: Path) -> None:
    path = tmp_path / "demo.db"
    p = subprocess.run(
        [sys.executable, "-m", "oxbus", "demo", "--events", "2000", "--db", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert report["pipeline"]["dead_letters"] == 0 and report["pipeline"]["published"] == 15
    assert (
        report["throughput"]["handled"] == 4000
        and report["throughput"]["health"]["status"] == "healthy"
    )
    assert report["durable"] == {
        "db": str(path),
        "orders": 12,
        "published": 54,
        "failed_calls": 9,
        "retried": 7,
        "dead_letters": 2,
    }
    assert run_json("stats", str(path))["events"] == 54

    text = subprocess.run(
        [sys.executable, "-m", "oxbus", "demo", "--events", "1000"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert text.returncode == 0, text.stderr[-3000:]
    assert "== 1. an order pipeline" in text.stdout and "== 3. the health report ==" in text.stdout
