"""``oxbus stats DB``: counts of a log: events per type and per stream, positions, dead
letters, and each durable subscription's progress (one JSON object with ``--json``)."""

from __future__ import annotations

from typing import Any

import click

from oxbus.cli._db import connect, db_argument
from oxbus.cli._output import UNREACHABLE, emit, fail, indent, json_mode, json_option, table
from oxbus.errors import StorageError
from oxbus.flow import LogReader


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
                rows(
                    "SELECT subscription, COUNT(*) FROM dead_letters GROUP BY 1 ORDER BY 2 DESC, 1"
                )
            ),
            "by_error_type": dict(
                rows("SELECT error_type, COUNT(*) FROM dead_letters GROUP BY 1 ORDER BY 2 DESC, 1")
            ),
        },
        "subscriptions": subs,
        "snapshots": snapshots,
    }


@click.command(short_help="Counts per type, stream, subscription; dead letters.")
@db_argument
@click.option(
    "--top",
    type=click.IntRange(min=0),
    default=20,
    show_default=True,
    help="Show the N largest event types and streams (0: all).",
)
@json_option
def stats(db: str, top: int) -> None:
    """Counts of the log DB: events per type and per stream, positions, dead letters,
    subscriptions and how many events each has finished. --json prints them as one object.
    Exit 0, or 3 when DB cannot be read."""
    with connect(db) as log:
        try:
            s = _stats(log, top)
        except StorageError as e:
            fail(f"{db}: {e}", UNREACHABLE)
    if json_mode():
        emit(s)
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
    click.echo(indent(table(list(s["by_event_type"].items()), ("EVENT TYPE", "EVENTS"))))
    shown = "" if top == 0 or s["streams"] <= top else f"top {top} of "
    click.echo(f"\nby stream ({shown}{s['streams']:,}):")
    click.echo(indent(table(list(s["by_stream"].items()), ("STREAM", "EVENTS"))))
    click.echo("\nsubscriptions:")
    click.echo(
        indent(
            table(
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
            indent(table(list(s["dead_letters"]["by_error_type"].items()), ("ERROR TYPE", "COUNT")))
        )
