"""``oxbus replay``: call a handler with every stored event, with a throttled progress bar."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from oxbus.cli._db import arun, connect, db_argument, event_filters, query, stored_rows
from oxbus.cli._output import FAILED, UNREACHABLE, emit, fail, json_mode, json_option
from oxbus.errors import StorageError

#: Seconds between two redraws of the progress bar: a terminal redraw costs more than a quick
#: handler call, so drawing per event would make the replay several times slower.
REDRAW_EVERY = 0.1


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


def _count(db: str, after: int, event_type: str | None, stream: str | None) -> int:
    where, args = ["position > ?"], [after]
    for column, value in (("event_type", event_type), ("stream_id", stream)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)  # type: ignore[arg-type]
    with connect(db) as log:
        ((total,),) = query(
            log, f"SELECT COUNT(*) FROM events WHERE {' AND '.join(where)}", tuple(args)
        )
    return int(total)


@click.command(short_help="Call a handler with every stored event.")
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
def replay(db: str, target: str, event_type: str | None, stream: str | None, after: int) -> None:
    """Call a handler with every stored event of DB, in log order, with a progress bar on
    stderr (redrawn at most 10 times a second).

    Each event is rebuilt into its class through the registry (importing the handler's module
    registers its DomainEvent classes), else passed as its data dict. A handler that raises
    is counted and the replay goes on. --json prints the report as one object. Exit 0 when
    every call succeeded, 1 when any raised, 2 when --to cannot be imported, 3 when DB
    cannot be read.
    """
    total = _count(db, after, event_type, stream)
    handler = _import_handler(target)
    from oxbus.store import SqliteEventStore

    errors: list[dict[str, Any]] = []
    calls = 0

    async def run() -> None:
        nonlocal calls
        pending, drawn = 0, time.perf_counter()
        with (
            SqliteEventStore(db, read_only=True) as store,
            click.progressbar(
                length=total, label=f"replaying to {target}", file=sys.stderr, show_pos=True
            ) as bar,
        ):
            rows = stored_rows(store, after=after, stream=stream, event_type=event_type)
            async with contextlib.aclosing(rows):
                async for r in rows:
                    calls += 1
                    # Whatever a call raises (an undecodable row too) is counted; it goes on.
                    try:
                        result = handler(store._row(r).event)
                        if inspect.isawaitable(result):
                            await result
                    except Exception as exc:  # noqa: BLE001
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
                    if time.perf_counter() - drawn >= REDRAW_EVERY:
                        bar.update(pending)
                        pending, drawn = 0, time.perf_counter()
            bar.update(pending)

    t0 = time.perf_counter()
    try:
        arun(run())
    except StorageError as e:
        fail(str(e), UNREACHABLE)
    elapsed = time.perf_counter() - t0
    report = {
        "events": calls,
        "succeeded": calls - len(errors),
        "failed": len(errors),
        "seconds": round(elapsed, 3),
        "errors": errors[:100],
    }
    if json_mode():
        emit(report)
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
