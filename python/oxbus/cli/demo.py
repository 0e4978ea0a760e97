"""``oxbus demo``: the README's demo (``oxbus.demo``); ``--json`` prints what it measured as
one object instead of the narration."""

from __future__ import annotations

import click

from oxbus.cli._db import arun
from oxbus.cli._output import UNREACHABLE, emit, fail, json_mode, json_option
from oxbus.errors import StorageError


@click.command(short_help="Run the demo (optionally writing a durable log).")
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
def demo(n: int, db: str | None) -> None:
    """Run the README's demo: an order pipeline (ordering, correlation, retries),
    throughput, and the health report. --json prints its measures as one object.

    Exit 0 when it ran; 3 when --db cannot be written.
    """
    from oxbus.demo import main as demo_main

    as_json = json_mode()
    try:
        report = arun(demo_main(n, db, out=(lambda _line: None) if as_json else click.echo))
    except StorageError as e:
        fail(str(e), UNREACHABLE)
    if as_json:
        emit(report)
