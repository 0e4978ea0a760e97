"""``oxbus events``: the stored events, oldest first, a line each (JSON Lines with ``--json``),
optionally following the file for new ones."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any

import click

from oxbus.cli._db import arun, connect, db_argument, event_filters, stored_rows
from oxbus.cli._output import UNREACHABLE, NoMatch, emit_line, fail, json_mode, json_option
from oxbus.errors import StorageError, UndecodableEvent


def _event_dict(e: Any) -> dict[str, Any]:
    """A ``StoredEvent`` as its JSON object."""
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
    when = str(r[9])[:19].replace("T", " ")
    where = f"{stream_id}@{version}"
    return f"{position:>6}  {when:19}  {where}  {event_type}  (undecodable: {err.reason})"


def _event_line(e: Any) -> str:
    data = json.dumps(e.data, default=str, ensure_ascii=False, separators=(", ", ": "))
    when = e.recorded_at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{e.position:>6}  {when}  {e.stream_id}@{e.version}  {e.event_type}  {data}"


@click.command(short_help="List stored events (--follow to keep watching).")
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
) -> None:
    """List the events of the log DB, oldest first.

    Text: position, recorded time, stream@version, type, data. --json prints one JSON
    object per line (JSON Lines), so it streams with --follow.

    Exit 0 when something was listed (or --follow was stopped), 1 when nothing matched,
    3 when DB cannot be read.
    """
    connect(db).close()  # missing file / not a log: exit 3, and never create a file
    from oxbus.store import SqliteEventStore

    as_json = json_mode()

    def show(store: SqliteEventStore, r: tuple[Any, ...]) -> None:
        try:
            e = store._row(r)
        except UndecodableEvent as err:
            out = _undecodable_dict(r, err) if as_json else _undecodable_line(r, err)
        else:
            out = _event_dict(e) if as_json else _event_line(e)
        if as_json:
            emit_line(out)
        else:
            click.echo(out)
            sys.stdout.flush()

    async def run() -> int:
        shown = 0
        poll = interval if follow else None
        with SqliteEventStore(db, read_only=True) as store:
            rows = stored_rows(store, after=after, stream=stream, event_type=event_type, poll=poll)
            async with contextlib.aclosing(rows):
                async for r in rows:
                    show(store, r)
                    shown += 1
                    if limit is not None and shown >= limit:
                        break
        return shown

    try:
        shown = arun(run())
    except KeyboardInterrupt:
        return  # the way to end --follow
    except StorageError as e:
        fail(str(e), UNREACHABLE)
    if shown == 0 and not follow:
        raise NoMatch("no events matched")
