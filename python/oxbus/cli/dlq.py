"""``oxbus dlq DB list|show|retry|purge``: the dead letters stored in a durable bus's log, or,
with a broker's URL (``amqp://``, ``redis://``) for DB and ``--group``, those of a consumer
group on the broker (see :mod:`oxbus.cli._dlq_broker`)."""

from __future__ import annotations

from typing import Any

import click

from oxbus.cli import _dlq_broker
from oxbus.cli._db import connect, db_argument, json_or_raw, query
from oxbus.cli._output import (
    DEAD_LETTER_KEYS, UNREACHABLE, emit, fail, json_mode, json_option, list_dead_letters,
    show_dead_letter,
)
from oxbus.errors import StorageError
from oxbus.flow import LogReader

_DEAD_LETTER = (
    "id",
    "position",
    "subscription",
    "attempts",
    "first_failed_at",
    "last_failed_at",
    "error_type",
    "error_message",
    "traceback",
)
_EVENT = ("event_type", "event_id", "stream_id", "data", "metadata")
_SELECT = (
    f"SELECT {', '.join([f'd.{c}' for c in _DEAD_LETTER] + [f'e.{c}' for c in _EVENT])}"
    " FROM dead_letters d LEFT JOIN events e ON e.position = d.position"
)


def _dlq_rows(log: LogReader, ids: list[int] | None = None) -> list[dict[str, Any]]:
    """The dead letters (those of ``ids``, else all), each with its event, by id."""
    where = "" if ids is None else f" WHERE d.id IN ({','.join('?' * len(ids))})"
    out = []
    for r in query(log, f"{_SELECT}{where} ORDER BY d.id", tuple(ids or ())):
        row = dict(zip(_DEAD_LETTER + _EVENT, r))
        row["data"], row["metadata"] = json_or_raw(row["data"]), json_or_raw(row["metadata"])
        out.append(row)
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


def _plural(n: int) -> str:
    return f"{n} dead letter{'' if n == 1 else 's'}"


@click.group(short_help="Dead letters: list, show, retry, purge.")
@db_argument
@json_option
@click.pass_context
def dlq(ctx: click.Context, db: str) -> None:
    """Dead letters stored in the durable bus's log DB: list, show, retry, purge.

    \b
      oxbus dlq DB list
      oxbus dlq DB show ID
      oxbus dlq DB retry ID... | --all
      oxbus dlq DB purge [--yes]

    Ids are those `list` prints; `db-7` (as bus.dead_letters shows it) works too.

    With a broker URL instead of DB, and --group after the subcommand: the dead letters of
    that group on the broker, as every member's bus.dead_letters sees them. An amqp:// (or
    amqps://) URL: RabbitMQ's queue <exchange>.<group>.dead (--exchange, --queue); a
    redis:// (rediss://, unix://) URL: the group's entries of the stream <stream>:dead
    (--stream). `retry` sends them back to the group, each for the subscription that failed
    only (a running member handles it); `purge` removes them all.

    \b
      oxbus dlq amqp://guest:guest@127.0.0.1:5672/%2f list --group billing
      oxbus dlq redis://127.0.0.1:6379/0 retry --all --group billing
    """
    ctx.obj = db


def _where(f: Any) -> Any:
    """The options naming a broker group, for an amqp:// or redis:// URL."""
    for option in reversed((
        click.option("--group", default="default", show_default=True,
                     help="With a broker URL: the consumer group."),
        click.option("--exchange", default="oxbus.events", show_default=True,
                     help="With an amqp:// URL."),
        click.option("--queue", default=None,
                     help="With an amqp:// URL: the group's queue, if not <exchange>.<group>."),
        click.option("--stream", default="oxbus:events", show_default=True,
                     help="With a redis:// URL: the stream (dead letters: <stream>:dead)."),
        click.option("--timeout", type=click.FloatRange(min=0.1), default=30.0,
                     show_default=True, help="With a broker URL: seconds to wait for it."),
    )):
        f = option(f)
    return f


def _source(db: str, where: dict[str, Any]) -> str | _dlq_broker.Source:
    return _dlq_broker.source(db, **where)


@dlq.command("list", short_help="List dead letters.")
@click.pass_obj
@_where
@json_option
def dlq_list(db: str, **where: Any) -> None:
    """List the dead letters, oldest first (--json: JSON Lines, without the tracebacks).
    Exit 0 (also when there are none), 3 when DB cannot be read."""
    src = _source(db, where)
    if isinstance(src, _dlq_broker.Source):
        return _dlq_broker.list_(src)
    with connect(db) as log:
        rows = _dlq_rows(log)
    list_dead_letters(
        rows, (("POSITION", lambda r: r["position"]), ("SUBSCRIPTION", lambda r: r["subscription"]))
    )

@dlq.command("show", short_help="One dead letter: event, error, traceback.")
@click.pass_obj
@click.argument("dead_letter_id", metavar="ID")
@_where
@json_option
def dlq_show(db: str, dead_letter_id: str, **where: Any) -> None:
    """Show one dead letter with its event and traceback. Exit 1 when there is no such id."""
    src = _source(db, where)
    if isinstance(src, _dlq_broker.Source):
        return _dlq_broker.show(src, dead_letter_id)
    did = _dl_id(dead_letter_id)
    with connect(db) as log:
        rows = _dlq_rows(log, [did])
    if not rows:
        fail(f"no dead letter with id {did} in {db}")
    show_dead_letter(rows[0], DEAD_LETTER_KEYS + ("position", "stream_id", "event_type", "event_id"))


@dlq.command("retry", short_help="Re-queue dead letters for the next start.")
@click.pass_obj
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "retry_all", is_flag=True, help="Retry every dead letter.")
@_where
@json_option
def dlq_retry(db: str, ids: tuple[str, ...], retry_all: bool, **where: Any) -> None:
    """Re-queue dead letters: each is delivered again, to its subscription only, the next time
    a durable bus with that subscription starts on DB.

    It removes the dead letter and the record that the subscription finished the event, so
    the bus's start-up replay delivers it (a bus running on DB now picks it up at its next
    start). Give ids or --all. Exit 1 when an id is not found (nothing is changed then).
    """
    if bool(ids) == retry_all:
        raise click.UsageError("give dead-letter ids or --all (not both)")
    src = _source(db, where)
    if isinstance(src, _dlq_broker.Source):
        return _dlq_broker.retry(src, None if retry_all else list(ids))
    wanted = None if retry_all else sorted({_dl_id(i) for i in ids})
    with connect(db, write=True) as log:
        try:
            rows = log.requeue_dead_letters(wanted)  # one transaction
        except StorageError as e:
            if str(e).startswith("no dead letter with id"):
                fail(f"{e}; nothing retried")
            fail(f"{db}: {e}", UNREACHABLE)
    if json_mode():
        emit({"retried": len(rows), "ids": [r[0] for r in rows]})
    else:
        click.echo(
            f"re-queued {_plural(len(rows))}: "
            "delivered again when a durable bus next starts on this file"
        )


@dlq.command("purge", short_help="Delete every dead letter.")
@click.pass_obj
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_where
@json_option
def dlq_purge(db: str, yes: bool, **where: Any) -> None:
    """Delete every dead letter of DB for good (their events stay in the log and are not
    delivered again). Asks first unless --yes; exit 1 when declined."""
    src = _source(db, where)
    if isinstance(src, _dlq_broker.Source):
        return _dlq_broker.purge(src, yes)
    with connect(db, write=True) as log:
        ((n,),) = query(log, "SELECT COUNT(*) FROM dead_letters")
        if n and not yes and not click.confirm(f"delete {n} dead letters from {db}?", err=True):
            fail("nothing purged")
        try:
            n = log.purge_dead_letters()
        except StorageError as e:
            fail(f"{db}: {e}", UNREACHABLE)
    if json_mode():
        emit({"purged": n})
    else:
        click.echo(f"purged {_plural(n)}")
