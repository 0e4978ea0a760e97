"""``oxbus flow DB``: the event-flow picture (event types -> handlers -> event types, with
counts) as Mermaid, DOT, SVG or PNG; ``--json`` prints the graph as one object instead."""

from __future__ import annotations

import json
import os
import sys

import click

from oxbus.cli._db import db_argument
from oxbus.cli._output import UNREACHABLE, emit, fail, json_mode, json_option
from oxbus.errors import StorageError

_SUFFIXES = {
    ".mmd": "mermaid",
    ".mermaid": "mermaid",
    ".dot": "dot",
    ".gv": "dot",
    ".svg": "svg",
    ".png": "png",
    ".json": "json",
}


@click.command(short_help="Draw event types -> handlers -> events, with counts.")
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
def flow(db: str, fmt: str | None, output: str | None) -> None:
    """Draw the event flow of the log DB: event types → the handlers (durable subscriptions)
    that handled them → the event types those handlers published, from the causation ids,
    with counts and failure rates (dead letters / deliveries) on the edges.

    --json prints the graph (event types, handlers, edges with counts) as one object; with
    -o FILE it draws FILE and prints what it wrote ({"output", "format", "bytes"}). Exit 0
    when drawn, 1 when DB has no events, 3 when DB cannot be read or svg/png needs `dot`
    and it is missing.
    """
    from oxbus import flow as flowmod

    as_json = json_mode()
    if as_json and output is None and fmt is not None:
        raise click.UsageError(f"--json prints the graph as JSON: give -o FILE to draw {fmt}")
    if fmt is None:
        fmt = _SUFFIXES.get(os.path.splitext(output or "")[1].lower(), "mermaid")
    try:
        graph = flowmod.read_flow(db)
    except StorageError as e:
        fail(str(e), UNREACHABLE)
    if not graph.events:
        fail(f"{db} has no events to draw")
    for t, positions in sorted(graph.undecodable.items()):
        shown = ", ".join(map(str, positions[:10])) + (", ..." if len(positions) > 10 else "")
        click.echo(
            f"note: {len(positions)} {t} event(s) cannot be decoded (positions {shown}): "
            "counted, but left out of the causation edges",
            err=True,
        )
    if as_json and output is None:
        emit(graph.to_dict())
        return
    data: bytes
    if fmt == "json":
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
            fail(str(e), UNREACHABLE)
    if output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(output, "wb") as f:
            f.write(data)
    except OSError as e:
        fail(f"{output}: {e}", UNREACHABLE)
    if as_json:
        emit({"output": output, "format": fmt, "bytes": len(data)})
    else:
        click.echo(f"wrote {output} ({fmt}, {len(data):,} bytes)", err=True)
