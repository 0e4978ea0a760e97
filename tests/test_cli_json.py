"""The command line's ``--json`` contract (issue 14), for every command: the flag is accepted
before the subcommand and after it with the same output; streams (``events``, ``dlq list``)
are JSON Lines, single results one object; errors, usage errors included, are one
``{"error": {"type", "message", "exit_code"}}`` line on stdout with that non-zero exit code,
while the text output and its errors stay as they were.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oxbus.cli.events
import oxbus.cli.stats
import pytest
from _cli import health_endpoint, run, write_log
from oxbus import SqliteEventStore
from oxbus.errors import StorageError


@pytest.fixture
async def db(tmp_path: Path) -> str:
    path = str(tmp_path / "log.db")
    await write_log(path)
    return path


@pytest.fixture
def health_url() -> Iterator[str]:
    with health_endpoint() as (url, handler):
        handler.body = json.dumps({"status": "healthy", "queue_size": 0}).encode()
        yield url


def places(args: list[str]) -> dict[str, list[str]]:
    """``args`` with --json before the subcommand, after it, and (dlq) at the dlq group."""
    out = {"before": ["--json", *args], "after": [*args, "--json"]}
    if args and args[0] == "dlq":
        out["group"] = ["dlq", "--json", *args[1:]]
    return out


def command_id(value: Any) -> str | None:
    return " ".join(value) if isinstance(value, list) else None


def copy_of(db: str, name: str) -> str:
    """A copy of the log (with its WAL files, if any) for a command that writes."""
    src = Path(db)
    for f in src.parent.glob(src.name + "*"):
        shutil.copy(f, src.parent / f.name.replace(src.name, name, 1))
    return str(src.parent / name)


# ---------------------------------------------------------------------- results

# args ({db}, {url}, {dir} are filled in), and the number of JSON lines for a stream (None:
# a single result, one object).
RESULTS: list[tuple[list[str], int | None]] = [
    (["events", "{db}"], 10),
    (["events", "{db}", "--type", "Note"], 1),
    (["events", "{db}", "--follow", "--limit", "3", "--interval", "0.05"], 3),
    (["dlq", "{db}", "list"], 1),
    (["dlq", "{db}", "show", "1"], None),
    (["dlq", "{db}", "retry", "1"], None),
    (["dlq", "{db}", "retry", "--all"], None),
    (["dlq", "{db}", "purge", "--yes"], None),
    (["replay", "{db}", "--to", "builtins:id"], None),
    (["stats", "{db}"], None),
    (["flow", "{db}"], None),
    (["flow", "{db}", "-o", "{dir}/flow.mmd"], None),
    (["health", "{url}"], None),
]


def parsed(stdout: str, lines: int | None) -> Any:
    if lines is None:
        obj = json.loads(stdout)  # one JSON value, nothing after it
        assert isinstance(obj, dict)
        obj.pop("seconds", None)  # replay's timing
        return obj
    records = [json.loads(line) for line in stdout.splitlines()]  # each line on its own
    assert len(records) == lines
    assert all(isinstance(r, dict) for r in records)
    return records


@pytest.mark.parametrize(("args", "lines"), RESULTS, ids=command_id)
def test_json_before_and_after_the_subcommand_prints_the_same_shape(
    db: str, health_url: str, tmp_path: Path, args: list[str], lines: int | None
) -> None:
    outputs = {}
    for where, argv in places(args).items():
        fill = {"db": copy_of(db, f"{where}.db"), "url": health_url, "dir": str(tmp_path)}
        r = run(*(a.format(**fill) for a in argv))
        assert r.exit_code == 0, (where, r.stdout, r.stderr)
        outputs[where] = parsed(r.stdout, lines)
        assert "Error" not in r.stderr
    first = next(iter(outputs.values()))
    assert all(o == first for o in outputs.values()), outputs


def test_streams_are_json_lines_with_one_compact_object_per_line(db: str) -> None:
    for args in (["events", db], ["dlq", db, "list"], ["events", db, "--type", "Note"]):
        r = run("--json", *args)
        assert r.exit_code == 0
        for line in r.stdout.splitlines():
            assert line.startswith("{") and line.endswith("}"), line
            assert isinstance(json.loads(line), dict)
    (letter,) = [json.loads(x) for x in run("--json", "dlq", db, "list").stdout.splitlines()]
    assert letter["subscription"] == "cli_pay" and "traceback" not in letter


def test_the_demo_takes_json_before_the_subcommand() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "oxbus", "--json", "demo", "--events", "0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    assert report["pipeline"]["published"] == 15 and "== 1." not in p.stdout


def test_flow_json_with_a_format_but_no_file_is_a_usage_error(db: str) -> None:
    r = run("flow", db, "--format", "dot", "--json")
    assert r.exit_code == 2
    assert "-o FILE" in json.loads(r.stdout)["error"]["message"]


# ----------------------------------------------------------------------- errors


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on return: nobody listens there


# args ({db}, {missing}, {empty}, {dead} are filled in), stdin, exit code, error type.
ERRORS: list[tuple[list[str], str | None, int, str]] = [
    (["events", "{missing}"], None, 3, "Unreachable"),
    (["events", "{db}", "--type", "NoSuchType"], None, 1, "NoMatch"),
    (["events", "{db}", "--bogus"], None, 2, "UsageError"),
    (["events", "{db}", "--limit", "0"], None, 2, "UsageError"),
    (["dlq", "{missing}", "list"], None, 3, "Unreachable"),
    (["dlq", "{db}", "show", "999"], None, 1, "Failed"),
    (["dlq", "{db}", "show", "abc"], None, 2, "UsageError"),
    (["dlq", "{db}", "retry"], None, 2, "UsageError"),
    (["dlq", "{db}"], None, 2, "UsageError"),
    (["dlq", "{db}", "retry", "999"], None, 1, "Failed"),
    (["dlq", "{db}", "purge"], "n\n", 1, "Failed"),
    (["dlq", "{db}", "nope"], None, 2, "UsageError"),
    (["replay", "{db}", "--to", "no_such_module_xyz:h"], None, 2, "UsageError"),
    (["replay", "{missing}", "--to", "os:getcwd"], None, 3, "Unreachable"),
    (["health", "{dead}", "--timeout", "5"], None, 3, "Unreachable"),
    (["health", "ftp://127.0.0.1:21"], None, 2, "UsageError"),
    (["stats", "{missing}"], None, 3, "Unreachable"),
    (["flow", "{empty}"], None, 1, "Failed"),
    (["flow", "{db}", "--format", "gif"], None, 2, "UsageError"),
    (["demo", "--events", "-1"], None, 2, "UsageError"),
    (["nope"], None, 2, "UsageError"),
]


@pytest.mark.parametrize(
    ("args", "stdin", "code", "kind"),
    ERRORS,
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_errors_are_one_json_object_with_a_non_zero_exit(
    db: str, tmp_path: Path, args: list[str], stdin: str | None, code: int, kind: str
) -> None:
    empty = str(tmp_path / "empty.db")
    SqliteEventStore(empty).close()
    fill = {
        "db": db,
        "missing": str(tmp_path / "missing.db"),
        "empty": empty,
        "dead": f"127.0.0.1:{closed_port()}",
    }
    argv = [a.format(**fill) for a in args]
    for where, line in places(argv).items():
        r = run(*line, input=stdin)
        assert r.exit_code == code, (where, r.stdout, r.stderr)
        (only,) = r.stdout.splitlines()  # one line: the error, nothing else
        error = json.loads(only)["error"]
        assert error["type"] == kind and error["exit_code"] == code, (where, error)
        assert isinstance(error["message"], str) and error["message"]
        assert "Error" not in r.stderr and "Usage:" not in r.stderr, (where, r.stderr)

    text = run(*argv, input=stdin)  # without --json: the message as text on stderr
    assert text.exit_code == code
    assert text.stdout == "" and text.stderr.strip()
    assert error["message"] in text.stderr


def test_a_missing_db_is_named_in_the_json_error(tmp_path: Path) -> None:
    r = run("--json", "stats", str(tmp_path / "nowhere.db"))
    assert r.exit_code == 3 and "nowhere.db" in json.loads(r.stdout)["error"]["message"]


def test_an_error_in_the_middle_of_a_stream_is_its_last_line(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = oxbus.cli.events._event_dict
    calls = 0

    def then_unreadable(e: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise StorageError("disk I/O error")
        return shown(e)

    monkeypatch.setattr(oxbus.cli.events, "_event_dict", then_unreadable)
    r = run("--json", "events", db)
    assert r.exit_code == 3
    *events, last = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["position"] for e in events] == [1, 2]
    assert last == {"error": {"type": "Unreachable", "message": "disk I/O error", "exit_code": 3}}


def test_a_bug_under_json_is_a_json_error_with_its_traceback_on_stderr(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(oxbus.cli.stats, "_stats", broken)
    r = run("stats", db, "--json")
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {
        "error": {"type": "RuntimeError", "message": "boom", "exit_code": 1}
    }
    assert "Traceback" in r.stderr
    with pytest.raises(RuntimeError, match="boom"):  # without --json it propagates as before
        run("stats", db)


def test_negative_answers_with_a_report_print_the_report_not_an_error() -> None:
    with health_endpoint() as (url, handler):
        handler.body = json.dumps({"status": "degraded", "reasons": ["queue 90% full"]}).encode()
        r = run("--json", "health", url)
    assert r.exit_code == 1
    assert json.loads(r.stdout) == {"status": "degraded", "reasons": ["queue 90% full"]}
