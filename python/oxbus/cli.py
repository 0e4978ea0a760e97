"""The ``oxbus`` command line (also ``python -m oxbus``), built on click.

Every subcommand has ``--help`` and ``--json``. Exit codes scripts can rely on:

====  ==================================================================================
0     done
1     done, and the answer is negative: ``events`` matched nothing, ``dlq show|retry ID``
      found no such dead letter, ``replay`` saw a handler raise, ``health`` is degraded or
      stopped, ``flow`` found no events, ``dlq purge`` was declined
2     usage error: unknown option, bad value, ``replay --to`` that cannot be imported
3     cannot reach: the DB file is missing or not an oxbus log, the health URL does not
      answer, or ``flow`` needs Graphviz's ``dot`` for svg/png and it is missing
====  ==================================================================================

Everything is read through oxbus's own SQLite (``oxbus.flow.LogReader`` and a read-only
``SqliteEventStore``), never Python's ``sqlite3``: ``main()`` may run inside a bus's process,
where a second copy of SQLite could make the bus's WAL vanish. Reading never writes the file
(it works in a read-only directory); only ``dlq retry|purge`` write. A row that cannot be
decoded is shown as undecodable, with its position and the reason.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable, NoReturn

import click

from oxbus._oxbus import __version__
from oxbus.errors import StorageError, UndecodableEvent
from oxbus.flow import LogReader

__all__ = ["main"]

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3


class Failed(click.ClickException):
    """Done, and the answer is negative: the message goes to stderr, exit code 1."""

    exit_code = FAILED


class Unreachable(click.ClickException):
    """The DB file or the URL cannot be reached: the message goes to stderr, exit code 3."""

    exit_code = UNREACHABLE


def _fail(message: str, code: int = FAILED) -> NoReturn:
    raise (Unreachable if code == UNREACHABLE else Failed)(message)


def _arun(coro: Any) -> Any:
    """``asyncio.run``, also when called from a running loop (``main()`` used as a library):
    then the coroutine runs on a loop of its own in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def _connect(db: str, *, write: bool = False) -> LogReader:
    from oxbus.flow import connect

    try:
        return connect(db, write=write)
    except StorageError as e:
        _fail(str(e), UNREACHABLE)


def _query(log: LogReader, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    try:
        return log.query(sql, args)
    except StorageError as e:
        _fail(str(e), UNREACHABLE)


def _json_or_raw(text: str | None) -> Any:
    """A stored JSON column decoded, or (not valid JSON) the text itself, marked."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        return {"undecodable": f"{type(e).__name__}: {e}", "raw": text[:200]}


def _table(rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> str:
    cells = [tuple(str(c) for c in headers)] + [
        tuple("" if c is None else str(c) for c in r) for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def event_filters(f: Any) -> Any:
    """The ``--stream``, ``--type`` and ``--after`` options of the commands that read events."""
    for option in reversed((
        click.option("--stream", help="Only this stream (a durable bus writes `$bus:<key>`)."),
        click.option("--type", "event_type", help="Only this event type."),
        click.option(
            "--after",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Only events after this position.",
        ),
    )):
        f = option(f)
    return f
db_argument = click.argument("db", type=click.Path(dir_okay=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="oxbus")
def main() -> None:
    """oxbus: look into a durable bus's SQLite log, manage its dead letters, replay it,
    draw its event flow, check a running bus's health.

    \b
    Exit codes: 0 done; 1 done with a negative answer (nothing matched, a handler raised,
    bus not healthy, no such dead letter); 2 usage error; 3 DB or URL unreachable.
    """


# ------------------------------------------------------------------------------ demo


@main.command(short_help="Run the demo (optionally writing a durable log).")
@click.option(
    "--events",
    "n",
    type=click.IntRange(min=0),
    default=200_000,
    show_default=True,
    help="Events for the throughput part (0 skips it).",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also run the pipeline on a durable bus logging to this file "
    "(appended to), for `oxbus flow`, `events`, `dlq`.",
)
@json_option
def demo(n: int, db: str | None, as_json: bool) -> None:
    """Run the README's demo: an order pipeline (ordering, correlation, retries),
    throughput, and the health report.

    Exit 0 when it ran; 3 when --db cannot be written.
    """
    from oxbus.demo import main as demo_main

    try:
        report = _arun(demo_main(n, db, out=(lambda _line: None) if as_json else click.echo))
    except StorageError as e:
        _fail(str(e), UNREACHABLE)
    if as_json:
        _emit_json(report)


# ---------------------------------------------------------------------------- events


def _event_dict(e: Any) -> dict[str, Any]:
    return {
        "position": e.position,
        "stream_id": e.stream_id,
        "version": e.version,
        "event_type": e.event_type,
        "event_version": e.event_version,
        "event_id": e.event_id,
        "occurred_at": e.occurred_at.isoformat() if e.occurred_at else None,
        "recorded_at": e.recorded_at.isoformat(),
        "correlation_id": e.correlation_id,
        "causation_id": e.causation_id,
        "metadata": e.metadata,
        "data": e.data,
    }


def _undecodable_dict(r: tuple[Any, ...], err: UndecodableEvent) -> dict[str, Any]:
    position, stream_id, version, event_type, event_version, _data, _meta, event_id, _o, rec = r
    return {
        "position": position,
        "stream_id": stream_id,
        "version": version,
        "event_type": event_type,
        "event_version": event_version,
        "event_id": event_id,
        "recorded_at": rec,
        "undecodable": err.reason,
    }


def _undecodable_line(r: tuple[Any, ...], err: UndecodableEvent) -> str:
    position, stream_id, version, event_type = r[:4]
    return f"{position:>6}  {str(r[9])[:19].replace('T', ' '):19}  {stream_id}@{version}  {event_type}  (undecodable: {err.reason})"


def _event_line(e: Any) -> str:
    data = json.dumps(e.data, default=str, ensure_ascii=False, separators=(", ", ": "))
    when = e.recorded_at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{e.position:>6}  {when}  {e.stream_id}@{e.version}  {e.event_type}  {data}"


@main.command(short_help="List stored events (--follow to keep watching).")
@db_argument
@event_filters
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Stop after this many events (with --follow too).",
)
@click.option(
    "--follow",
    "-f",
    is_flag=True,
    help="Keep polling the file for new events until Ctrl-C (or --limit).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=0.5,
    show_default=True,
    help="Seconds between polls with --follow.",
)
@json_option
def events(
    db: str,
    stream: str | None,
    event_type: str | None,
    after: int,
    limit: int | None,
    follow: bool,
    interval: float,
    as_json: bool,
) -> None:
    """List the events of the log DB, oldest first.

    Text: position, recorded time, stream@version, type, data. --json prints one JSON
    object per line (JSON Lines), so it streams with --follow.

    Exit 0 when something was listed (or --follow was stopped), 1 when nothing matched,
    3 when DB cannot be read.
    """
    _connect(db).close()  # missing file / not a log: exit 3, and never create a file
    from oxbus.store import SqliteEventStore

    def show(store: SqliteEventStore, r: tuple[Any, ...]) -> None:
        try:
            e = store._row(r)
            out = (
                json.dumps(_event_dict(e), default=str, ensure_ascii=False)
                if as_json
                else _event_line(e)
            )
        except UndecodableEvent as err:
            out = (
                json.dumps(_undecodable_dict(r, err), default=str, ensure_ascii=False)
                if as_json
                else _undecodable_line(r, err)
            )
        click.echo(out)
        sys.stdout.flush()

    async def run() -> int:
        shown = 0
        pos = after
        with SqliteEventStore(db, read_only=True) as store:
            while True:
                while True:
                    page = await store._core.read_all(pos, 1000)
                    for r in page:
                        pos = r[0]
                        if (stream is None or r[1] == stream) and (
                            event_type is None or r[3] == event_type
                        ):
                            show(store, r)
                            shown += 1
                            if limit is not None and shown >= limit:
                                return shown
                    if len(page) < 1000:
                        break
                if not follow:
                    return shown
                await asyncio.sleep(interval)  # polling the file: another process writes it

    try:
        shown = _arun(run())
    except KeyboardInterrupt:
        return  # the way to end --follow
    except StorageError as e:
        _fail(str(e), UNREACHABLE)
    if shown == 0 and not follow:
        if not as_json:
            click.echo("no events matched", err=True)
        sys.exit(FAILED)


# ------------------------------------------------------------------------------- dlq


def _dlq_rows(log: LogReader, ids: list[int] | None = None) -> list[dict[str, Any]]:
    sql = """SELECT d.id, d.position, d.subscription, d.attempts, d.first_failed_at, d.last_failed_at,
                    d.error_type, d.error_message, d.traceback, e.event_type, e.event_id, e.stream_id,
                    e.data, e.metadata
             FROM dead_letters d LEFT JOIN events e ON e.position = d.position"""
    args: list[Any] = []
    if ids is not None:
        sql += f" WHERE d.id IN ({','.join('?' * len(ids))})"
        args = list(ids)
    out = []
    for r in _query(log, sql + " ORDER BY d.id", tuple(args)):
        (
            did,
            pos,
            sub,
            attempts,
            first,
            last,
            etype,
            emsg,
            tb,
            evtype,
            evid,
            stream,
            data,
            meta,
        ) = r
        out.append(
            {
                "id": did,
                "position": pos,
                "subscription": sub,
                "attempts": attempts,
                "first_failed_at": first,
                "last_failed_at": last,
                "error_type": etype,
                "error_message": emsg,
                "traceback": tb,
                "event_type": evtype,
                "event_id": evid,
                "stream_id": stream,
                "data": _json_or_raw(data),
                "metadata": _json_or_raw(meta),
            }
        )
    return out


def _dl_id(value: str) -> int:
    """A dead letter id as the CLI prints it (`7`) or as ``bus.dead_letters`` does (`db-7`)."""
    raw = value.removeprefix("db-")
    try:
        return int(raw)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a dead-letter id (like 7 or db-7)", param_hint="ID"
        ) from None


@main.group(short_help="Dead letters: list, show, retry, purge.")
@db_argument
@click.pass_context
def dlq(ctx: click.Context, db: str) -> None:
    """Dead letters stored in the durable bus's log DB: list, show, retry, purge.

    \b
      oxbus dlq DB list
      oxbus dlq DB show ID
      oxbus dlq DB retry ID... | --all
      oxbus dlq DB purge [--yes]

    Ids are those `list` prints; `db-7` (as bus.dead_letters shows it) works too.
    """
    ctx.obj = db


@dlq.command("list", short_help="List dead letters.")
@click.pass_obj
@json_option
def dlq_list(db: str, as_json: bool) -> None:
    """List the dead letters, oldest first. Exit 0 (also when there are none), 3 when DB
    cannot be read."""
    with _connect(db) as log:
        rows = _dlq_rows(log)
    if as_json:
        _emit_json([{k: v for k, v in r.items() if k != "traceback"} for r in rows])
        return
    if not rows:
        click.echo("no dead letters")
        return
    click.echo(
        _table(
            [
                (
                    r["id"],
                    r["position"],
                    r["subscription"],
                    r["event_type"],
                    r["attempts"],
                    r["last_failed_at"][:19],
                    f"{r['error_type']}: {r['error_message']}"[:70],
                )
                for r in rows
            ],
            ("ID", "POSITION", "SUBSCRIPTION", "EVENT TYPE", "ATTEMPTS", "LAST FAILED", "ERROR"),
        )
    )


@dlq.command("show", short_help="One dead letter: event, error, traceback.")
@click.pass_obj
@click.argument("dead_letter_id", metavar="ID")
@json_option
def dlq_show(db: str, dead_letter_id: str, as_json: bool) -> None:
    """Show one dead letter with its event and traceback. Exit 1 when there is no such id."""
    did = _dl_id(dead_letter_id)
    with _connect(db) as log:
        rows = _dlq_rows(log, [did])
    if not rows:
        _fail(f"no dead letter with id {did} in {db}")
    r = rows[0]
    if as_json:
        _emit_json(r)
        return
    for k in (
        "id",
        "subscription",
        "attempts",
        "first_failed_at",
        "last_failed_at",
        "error_type",
        "error_message",
        "position",
        "stream_id",
        "event_type",
        "event_id",
    ):
        click.echo(f"{k + ':':<17}{r[k]}")
    click.echo(f"{'data:':<17}{json.dumps(r['data'], ensure_ascii=False)}")
    click.echo(f"{'metadata:':<17}{json.dumps(r['metadata'], ensure_ascii=False)}")
    click.echo("traceback:")
    click.echo(
        "  " + r["traceback"].rstrip().replace("\n", "\n  ") if r["traceback"] else "  (none)"
    )


@dlq.command("retry", short_help="Re-queue dead letters for the next start.")
@click.pass_obj
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
@json_option
def dlq_retry(db: str, ids: tuple[str, ...], retry_all: bool, as_json: bool) -> None:
    """Re-queue dead letters: each is delivered again, to its subscription only, the next time
    a durable bus with that subscription starts on DB.

    It removes the dead letter and the record that the subscription finished the event, so
    the bus's start-up replay delivers it (a bus running on DB now picks it up at its next
    start). Give ids or --all. Exit 1 when an id is not found (nothing is changed then).
    """
    if bool(ids) == retry_all:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    wanted = None if retry_all else sorted({_dl_id(i) for i in ids})
    with _connect(db, write=True) as log:
        try:
            rows = log.requeue_dead_letters(wanted)  # one transaction
        except StorageError as e:
            if str(e).startswith("no dead letter with id"):
                _fail(f"{e}; nothing retried")
            _fail(f"{db}: {e}", UNREACHABLE)
    if as_json:
        _emit_json({"retried": len(rows), "ids": [r[0] for r in rows]})
    else:
        click.echo(
            f"re-queued {len(rows)} dead letter{'' if len(rows) == 1 else 's'}: "
            "delivered again when a durable bus next starts on this file"
        )


@dlq.command("purge", short_help="Delete every dead letter.")
@click.pass_obj
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@json_option
def dlq_purge(db: str, yes: bool, as_json: bool) -> None:
    """Delete every dead letter of DB for good (their events stay in the log and are not
    delivered again). Asks first unless --yes; exit 1 when declined."""
    with _connect(db, write=True) as log:
        ((n,),) = _query(log, "SELECT COUNT(*) FROM dead_letters")
        if n and not yes and not click.confirm(f"delete {n} dead letters from {db}?", err=True):
            _fail("nothing purged")
        try:
            n = log.purge_dead_letters()
        except StorageError as e:
            _fail(f"{db}: {e}", UNREACHABLE)
    if as_json:
        _emit_json({"purged": n})
    else:
        click.echo(f"purged {n} dead letter{'' if n == 1 else 's'}")


# ---------------------------------------------------------------------------- replay


def _import_handler(spec: str) -> Callable[[Any], Any]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            f"{spec!r}: expected module:handler (like myapp.handlers:project)", param_hint="'--to'"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: the project's modules import
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {type(e).__name__}: {e}", param_hint="'--to'"
        ) from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise click.BadParameter(
                f"{module_name!r} has no attribute {attr!r}", param_hint="'--to'"
            ) from None
    if not callable(obj):
        raise click.BadParameter(f"{spec} is not callable", param_hint="'--to'")
    return obj  # type: ignore[no-any-return]


@main.command(short_help="Call a handler with every stored event.")
@db_argument
@click.option(
    "--to",
    "target",
    required=True,
    metavar="MODULE:HANDLER",
    help="The handler to call with each event: `def h(event)` or `async def h(event)`.",
)
@event_filters
@json_option
def replay(
    db: str, target: str, event_type: str | None, stream: str | None, after: int, as_json: bool
) -> None:
    """Call a handler with every stored event of DB, in log order, with a progress bar.

    Each event is rebuilt into its class through the registry (importing the handler's module
    registers its DomainEvent classes), else passed as its data dict. A handler that raises
    is counted and the replay goes on. Exit 0 when every call succeeded, 1 when any raised,
    2 when --to cannot be imported, 3 when DB cannot be read.
    """
    with _connect(db) as log:
        where, args = ["position > ?"], [after]
        if event_type is not None:
            where.append("event_type = ?")
            args.append(event_type)  # type: ignore[arg-type]
        if stream is not None:
            where.append("stream_id = ?")
            args.append(stream)  # type: ignore[arg-type]
        ((total,),) = _query(
            log, f"SELECT COUNT(*) FROM events WHERE {' AND '.join(where)}", tuple(args)
        )
    handler = _import_handler(target)
    from oxbus.store import SqliteEventStore

    errors: list[dict[str, Any]] = []
    calls = 0

    async def run() -> None:
        nonlocal calls
        # Redrawn at most every 0.1 s, not per event (a terminal redraw costs more than
        # a quick handler call).
        pending, drawn = 0, time.perf_counter()
        with (
            SqliteEventStore(db, read_only=True) as store,
            click.progressbar(
                length=total, label=f"replaying to {target}", file=sys.stderr, show_pos=True
            ) as bar,
        ):
            pos = after
            while True:
                page = await store._core.read_all(pos, 1000)
                for r in page:
                    pos = r[0]
                    if (event_type is not None and r[3] != event_type) or (
                        stream is not None and r[1] != stream
                    ):
                        continue
                    calls += 1
                    try:
                        e = store._row(r)
                        result = handler(e.event)
                        if inspect.isawaitable(result):
                            await result
                    except Exception as exc:  # an undecodable row counts as a failed call
                        errors.append(
                            {
                                "position": r[0],
                                "event_type": r[3],
                                "event_id": r[7],
                                "error_type": type(exc).__qualname__,
                                "error_message": str(exc),
                            }
                        )
                    pending += 1
                    if time.perf_counter() - drawn >= 0.1:
                        bar.update(pending)
                        pending, drawn = 0, time.perf_counter()
                if len(page) < 1000:
                    break
            bar.update(pending)

    t0 = time.perf_counter()
    try:
        _arun(run())
    except StorageError as e:
        _fail(str(e), UNREACHABLE)
    elapsed = time.perf_counter() - t0
    report = {
        "events": calls,
        "succeeded": calls - len(errors),
        "failed": len(errors),
        "seconds": round(elapsed, 3),
        "errors": errors[:100],
    }
    if as_json:
        _emit_json(report)
    else:
        click.echo(
            f"replayed {calls} events to {target} in {elapsed:.2f}s: "
            f"{calls - len(errors)} succeeded, {len(errors)} raised"
        )
        for err in errors[:10]:
            click.echo(
                f"  position {err['position']} {err['event_type']}: "
                f"{err['error_type']}: {err['error_message']}",
                err=True,
            )
        if len(errors) > 10:
            click.echo(f"  ... and {len(errors) - 10} more", err=True)
    if errors:
        sys.exit(FAILED)


# ---------------------------------------------------------------------------- health


def _health_url(url: str) -> str:
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    return url if url.endswith("/health") else url + "/health"


def _redis_group_health(url: str, group: str, stream: str, timeout: float, as_json: bool) -> None:
    """``health redis://...``: the group's members and partition leases, read from Redis."""
    from oxbus import _group_health
    from oxbus.errors import TransportError
    from oxbus.transports import redact

    async def read() -> dict[str, Any]:
        return await asyncio.wait_for(
            _group_health.read(url, group=group, stream=stream), timeout
        )

    try:
        report = asyncio.run(read())
    except (TransportError, asyncio.TimeoutError) as e:
        _fail(f"{redact(url)}: unreachable: {e or 'timed out'}", UNREACHABLE)
    if as_json:
        _emit_json(report)
    else:
        click.echo("\n".join(_group_health.lines(report)))
    if report["status"] != "healthy":
        sys.exit(FAILED)


@main.command(short_help="A running bus's health (metrics endpoint), or a Redis group's.")
@click.argument("url")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for an answer.",
)
@click.option("--group", default="default", show_default=True, help="With a redis:// URL.")
@click.option("--stream", default="oxbus:events", show_default=True, help="With a redis:// URL.")
@json_option
def health(url: str, timeout: float, group: str, stream: str, as_json: bool) -> None:
    """Print a running bus's health, from its metrics endpoint (GET URL/health, as served by
    oxbus.metrics.serve(bus, port=...)). URL is like http://localhost:9100 or localhost:9100.

    With a redis://, rediss:// or unix:// URL: the consumer group GROUP of STREAM as Redis
    holds it: its live members and which one holds each partition (with partitions=N).

    Exit 0 when the status is healthy, 1 when degraded or stopped (a Redis group: a partition
    held by no live member, or no member at all), 3 when URL does not answer.
    """
    if url.lower().startswith(("redis://", "rediss://", "unix://")):
        _redis_group_health(url, group, stream, timeout, as_json)
        return
    target = _health_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:  # a server may answer 503 with the JSON when unhealthy
        body = e.read()
        e.close()
        if not body:
            _fail(f"{target}: HTTP {e.code} {e.reason}", UNREACHABLE)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        _fail(f"{target}: unreachable: {reason}", UNREACHABLE)
    try:
        report = json.loads(body)
        status = report["status"]
    except (ValueError, TypeError, KeyError):
        _fail(f"{target}: the answer is not oxbus health JSON: {body[:200]!r}", UNREACHABLE)
    if as_json:
        _emit_json(report)
    else:
        for k, v in report.items():
            click.echo(f"{k + ':':<28}{json.dumps(v) if isinstance(v, (dict, list)) else v}")
    if status != "healthy":
        sys.exit(FAILED)


# ----------------------------------------------------------------------------- stats


def _stats(log: LogReader, top: int) -> dict[str, Any]:
    limit = -1 if top == 0 else top

    def one(sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        return log.query(sql, args)[0]

    def rows(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return log.query(sql, args)

    count, first, last, t0, t1 = one(
        "SELECT COUNT(*), MIN(position), MAX(position), MIN(recorded_at), MAX(recorded_at) FROM events"
    )
    (streams,) = one("SELECT COUNT(DISTINCT stream_id) FROM events")
    (dead,) = one("SELECT COUNT(*) FROM dead_letters")
    (snapshots,) = (
        one("SELECT COUNT(*) FROM snapshots")
        if rows("SELECT 1 FROM sqlite_master WHERE name = 'snapshots'")
        else (0,)
    )
    subs = []
    for name, start_after in rows("SELECT name, start_after FROM subscriptions ORDER BY name"):
        done, last_done = one(
            "SELECT COUNT(*), MAX(position) FROM progress WHERE subscription = ?", (name,)
        )
        (sub_dead,) = one("SELECT COUNT(*) FROM dead_letters WHERE subscription = ?", (name,))
        subs.append(
            {
                "name": name,
                "start_after": start_after,
                "delivered": done,
                "last_delivered_position": last_done,
                "dead_letters": sub_dead,
            }
        )
    return {
        "events": count,
        "positions": {"first": first, "last": last},
        "recorded": {"first": t0, "last": t1},
        "by_event_type": dict(
            rows(
                "SELECT event_type, COUNT(*) FROM events GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
                (limit,),
            )
        ),
        "streams": streams,
        "by_stream": dict(
            rows(
                "SELECT stream_id, COUNT(*) FROM events GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT ?",
                (limit,),
            )
        ),
        "dead_letters": {
            "total": dead,
            "by_subscription": dict(
                rows("SELECT subscription, COUNT(*) FROM dead_letters GROUP BY 1 ORDER BY 2 DESC, 1")
            ),
            "by_error_type": dict(
                rows("SELECT error_type, COUNT(*) FROM dead_letters GROUP BY 1 ORDER BY 2 DESC, 1")
            ),
        },
        "subscriptions": subs,
        "snapshots": snapshots,
    }


@main.command(short_help="Counts per type, stream, subscription; dead letters.")
@db_argument
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Show the N largest event types and streams (0: all).",
)
@json_option
def stats(db: str, top: int, as_json: bool) -> None:
    """Counts of the log DB: events per type and per stream, positions, dead letters,
    subscriptions and how many events each has finished. Exit 0, or 3 when DB cannot be read."""
    with _connect(db) as log:
        try:
            s = _stats(log, top)
        except StorageError as e:
            _fail(f"{db}: {e}", UNREACHABLE)
    if as_json:
        _emit_json(s)
        return
    pos = s["positions"]
    click.echo(
        f"{db}: {s['events']:,} events in {s['streams']:,} streams, positions "
        f"{pos['first']}..{pos['last']}, {s['dead_letters']['total']:,} dead letters, "
        f"{s['snapshots']:,} snapshots"
    )
    if s["recorded"]["first"]:
        click.echo(f"recorded {s['recorded']['first']} .. {s['recorded']['last']}")
    click.echo("\nby event type:")
    click.echo(_indent(_table(list(s["by_event_type"].items()), ("EVENT TYPE", "EVENTS"))))
    shown = "" if top == 0 or s["streams"] <= top else f"top {top} of "
    click.echo(f"\nby stream ({shown}{s['streams']:,}):")
    click.echo(_indent(_table(list(s["by_stream"].items()), ("STREAM", "EVENTS"))))
    click.echo("\nsubscriptions:")
    click.echo(
        _indent(
            _table(
                [
                    (
                        x["name"],
                        x["start_after"],
                        x["delivered"],
                        x["last_delivered_position"],
                        x["dead_letters"],
                    )
                    for x in s["subscriptions"]
                ],
                ("NAME", "STARTS AFTER", "DELIVERED", "LAST DELIVERED", "DEAD LETTERS"),
            )
        )
    )
    if s["dead_letters"]["total"]:
        click.echo("\ndead letters by error type:")
        click.echo(
            _indent(
                _table(list(s["dead_letters"]["by_error_type"].items()), ("ERROR TYPE", "COUNT"))
            )
        )


def _indent(text: str) -> str:
    return "  " + text.replace("\n", "\n  ")


# ------------------------------------------------------------------------------ flow

_SUFFIXES = {
    ".mmd": "mermaid",
    ".mermaid": "mermaid",
    ".dot": "dot",
    ".gv": "dot",
    ".svg": "svg",
    ".png": "png",
    ".json": "json",
}


@main.command(short_help="Draw event types -> handlers -> events, with counts.")
@db_argument
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot", "svg", "png"]),
    default=None,
    help="Output format [default: from -o's suffix, else mermaid]. svg and png need "
    "Graphviz's `dot`.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write to this file instead of standard output.",
)
@json_option
def flow(db: str, fmt: str | None, output: str | None, as_json: bool) -> None:
    """Draw the event flow of the log DB: event types → the handlers (durable subscriptions)
    that handled them → the event types those handlers published, from the causation ids,
    with counts and failure rates (dead letters / deliveries) on the edges.

    --json prints the graph (event types, handlers, edges with counts) instead. Exit 0 when
    drawn, 1 when DB has no events, 3 when DB cannot be read or svg/png needs `dot` and it
    is missing.
    """
    from oxbus import flow as flowmod

    if fmt is None:
        fmt = _SUFFIXES.get(os.path.splitext(output or "")[1].lower(), "mermaid")
    try:
        graph = flowmod.read_flow(db)
    except StorageError as e:
        _fail(str(e), UNREACHABLE)
    if not graph.events:
        _fail(f"{db} has no events to draw")
    for t, positions in sorted(graph.undecodable.items()):
        shown = ", ".join(map(str, positions[:10])) + (", ..." if len(positions) > 10 else "")
        click.echo(
            f"note: {len(positions)} {t} event(s) cannot be decoded (positions {shown}): "
            "counted, but left out of the causation edges",
            err=True,
        )
    data: bytes
    if as_json or fmt == "json":
        data = (json.dumps(graph.to_dict(), indent=2, ensure_ascii=False) + "\n").encode()
    elif fmt == "mermaid":
        data = flowmod.to_mermaid(graph).encode()
    elif fmt == "dot":
        data = flowmod.to_dot(graph).encode()
    else:
        if output is None and sys.stdout.isatty() and fmt == "png":
            raise click.UsageError("png is binary: give -o FILE or redirect standard output")
        try:
            data = flowmod.render(graph, fmt)
        except flowmod.RenderError as e:
            _fail(str(e), UNREACHABLE)
    if output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(output, "wb") as f:
            f.write(data)
    except OSError as e:
        _fail(f"{output}: {e}", UNREACHABLE)
    click.echo(f"wrote {output} ({fmt if not as_json else 'json'}, {len(data):,} bytes)", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
