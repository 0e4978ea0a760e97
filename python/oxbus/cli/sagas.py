"""``oxbus sagas DB``: the saga instances a durable bus keeps in its log (``saga_instances``),
with their state, step and deadlines; JSON Lines with ``--json``, one instance per line."""

from __future__ import annotations

from typing import Any

import click

from oxbus.cli._db import connect, db_argument, json_or_raw, query
from oxbus.cli._output import NoMatch, emit_line, json_mode, json_option, table
from oxbus.flow import LogReader
from oxbus.saga import STATES

_COLUMNS = (
    "saga",
    "key",
    "status",
    "step",
    "steps",
    "state",
    "compensations",
    "compensated",
    "error",
    "correlation_id",
    "started_at",
    "updated_at",
)


def _instances(
    log: LogReader, state: str | None, saga: str | None, key: str | None
) -> list[dict[str, Any]]:
    """The instances that match, by saga and key, each with its deadlines."""
    if not query(log, "SELECT 1 FROM sqlite_master WHERE name = 'saga_instances'"):
        return []  # a log written before sagas were stored
    where, args = [], []
    for column, value in (("status", state), ("saga", saga), ("key", key)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    sql = f"SELECT {', '.join(_COLUMNS)} FROM saga_instances"
    if where:
        sql += " WHERE " + " AND ".join(where)
    deadlines: dict[tuple[str, str], dict[str, float]] = {}
    for s, k, name, due in query(
        log, "SELECT saga, key, name, due FROM saga_deadlines ORDER BY saga, key, due, name"
    ):
        deadlines.setdefault((s, k), {})[name] = due
    out = []
    for r in query(log, sql + " ORDER BY saga, key", tuple(args)):
        row = dict(zip(_COLUMNS, r))
        row["state"] = json_or_raw(row["state"])
        comps = json_or_raw(row["compensations"])
        row["compensations"] = (
            [c.get("type") for c in comps if isinstance(c, dict)]
            if isinstance(comps, list)
            else comps
        )
        row["compensated"] = bool(row["compensated"])
        row["deadlines"] = deadlines.get((row["saga"], row["key"]), {})
        out.append(row)
    return out


@click.command(short_help="List saga instances and their state.")
@db_argument
@click.option(
    "--state",
    type=click.Choice(STATES),
    default=None,
    help="Only instances in this state.",
)
@click.option("--saga", default=None, help="Only this saga (its name: the class name by default).")
@click.option("--key", default=None, help="Only the instance with this key.")
@json_option
def sagas(db: str, state: str | None, saga: str | None, key: str | None) -> None:
    """List the saga instances stored in the durable bus's log DB: saga, key, state
    (running, completed, compensated, failed), the last step applied, how many events were
    applied, pending deadlines and the error of a failed one.

    --json prints JSON Lines, one instance per line, with its state, compensations and
    deadlines (name -> due time on the bus's clock). Exit 0, 1 when no instance matched, 3
    when DB cannot be read.
    """
    with connect(db) as log:
        found = _instances(log, state, saga, key)
    if json_mode():
        for row in found:
            emit_line(row)
    elif found:
        rows = [
            (
                r["saga"],
                r["key"],
                r["status"],
                r["step"] or "-",
                r["steps"],
                ", ".join(f"{n}@{due:g}" for n, due in r["deadlines"].items()) or "-",
                r["updated_at"],
                r["error"] or "",
            )
            for r in found
        ]
        click.echo(
            table(rows, ("SAGA", "KEY", "STATE", "STEP", "STEPS", "DEADLINES", "UPDATED", "ERROR"))
        )
        counts = {s: sum(r["status"] == s for r in found) for s in STATES}
        click.echo(
            f"\n{len(found):,} instance{'' if len(found) == 1 else 's'}: "
            + ", ".join(f"{n:,} {s}" for s, n in counts.items() if n)
        )
    if not found:
        what = " ".join(
            f"{k}={v}" for k, v in (("state", state), ("saga", saga), ("key", key)) if v
        )
        raise NoMatch(f"no saga instances{' with ' + what if what else ''} in {db}")
