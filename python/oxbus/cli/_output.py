"""What every command prints, in one place: ``--json`` (before or after the subcommand), the
JSON shapes, the errors and their exit codes, and the text tables.

Under ``--json`` standard output carries only JSON:

- a single result is one JSON object (:func:`emit`);
- a stream (events, dead letters) is JSON Lines, one object per line, flushed per line
  (:func:`emit_line`);
- an error is one line ``{"error": {"type", "message", "exit_code"}}`` and the exit code is
  not 0 (:class:`Cli` turns every exception into it, usage errors included).

Progress bars and notes stay on standard error.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import click

__all__ = [
    "FAILED",
    "UNREACHABLE",
    "Cli",
    "Failed",
    "NoMatch",
    "Unreachable",
    "emit",
    "emit_line",
    "fail",
    "indent",
    "json_mode",
    "json_option",
    "table",
]

OK, FAILED, USAGE, UNREACHABLE = 0, 1, 2, 3

_JSON = "oxbus.cli.json"  # ctx.meta key (meta is shared by a context and its children)
_ASKED = "oxbus.cli.json_asked"  # the command line names --json (known before parsing)


class Failed(click.ClickException):
    """Done, and the answer is negative: the message goes to stderr, exit code 1."""

    exit_code = FAILED


class Unreachable(click.ClickException):
    """The DB file or the URL cannot be reached: the message goes to stderr, exit code 3."""

    exit_code = UNREACHABLE


class NoMatch(Failed):
    """Nothing matched: exit code 1, the message printed as it is (no ``Error:``)."""

    def show(self, file: Any = None) -> None:
        click.echo(self.format_message(), file=file, err=True)


def fail(message: str, code: int = FAILED) -> NoReturn:
    """Raise the error of exit code ``code`` (:data:`FAILED` or :data:`UNREACHABLE`)."""
    raise (Unreachable if code == UNREACHABLE else Failed)(message)


# ------------------------------------------------------------------------------ --json


def _remember_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_JSON] = True


#: ``--json`` for the group and for every command: one flag, whichever level it is given at.
json_option = click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    callback=_remember_json,
    help="Print JSON: one object, or JSON Lines for a stream; errors as "
    '{"error": {...}}. Also accepted before the subcommand.',
)


def json_mode() -> bool:
    """Whether the running command was given ``--json`` (at any level)."""
    return bool(click.get_current_context().meta.get(_JSON))


def emit(obj: Any) -> None:
    """A single result: one JSON object."""
    click.echo(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def emit_line(obj: Any) -> None:
    """One record of a stream: one JSON object on one line, flushed (``--follow`` streams)."""
    click.echo(json.dumps(obj, default=str, ensure_ascii=False))
    sys.stdout.flush()


def _show_as_json(e: BaseException) -> int:
    """Print ``e`` as ``{"error": {...}}``; its exit code."""
    if isinstance(e, click.ClickException):
        # click's own subclasses of UsageError vary with its version: one stable name.
        kind = "UsageError" if isinstance(e, click.UsageError) else type(e).__name__
        message, code = e.format_message(), e.exit_code
    elif isinstance(e, (click.Abort, KeyboardInterrupt)):
        kind, message, code = "Aborted", "aborted", FAILED
    else:  # a bug: its traceback goes to stderr for the report
        traceback.print_exception(e, file=sys.stderr)
        kind, message, code = type(e).__name__, str(e), FAILED
    emit_line({"error": {"type": kind, "message": message, "exit_code": code}})
    return code


@contextlib.contextmanager
def _json_errors(ctx: click.Context) -> Iterator[None]:
    try:
        yield
    except click.exceptions.Exit:
        raise  # --help, --version, an error already shown
    except (Exception, KeyboardInterrupt) as e:
        if not (ctx.meta.get(_JSON) or ctx.meta.get(_ASKED)):
            raise
        raise click.exceptions.Exit(_show_as_json(e)) from e


class Cli(click.Group):
    """The root group: under ``--json`` (given anywhere on the command line) every error of
    a subcommand, and of parsing, is shown as JSON."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Known before parsing, so that an unknown option or a bad value (which stops the
        # parse before --json's callback runs) is reported as JSON too.
        ctx.meta[_ASKED] = "--json" in args[: args.index("--") if "--" in args else None]
        with _json_errors(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        with _json_errors(ctx):
            return super().invoke(ctx)


# ------------------------------------------------------------------------------- text


def table(rows: list[tuple[Any, ...]], headers: tuple[str, ...]) -> str:
    """Rows under headers, in columns as wide as their widest cell."""
    cells = [tuple(str(c) for c in headers)] + [
        tuple("" if c is None else str(c) for c in r) for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def list_dead_letters(
    rows: list[dict[str, Any]], columns: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...]
) -> None:
    """Dead letters as ``oxbus dlq list`` prints them: a table of id, ``columns`` (where they
    are kept, their subscription), event type, attempts, last failure and error; ``--json``:
    JSON Lines without the tracebacks."""
    if json_mode():
        for r in rows:
            emit_line({k: v for k, v in r.items() if k != "traceback"})
        return
    if not rows:
        click.echo("no dead letters")
        return
    click.echo(
        table(
            [
                (
                    r["id"],
                    *(cell(r) for _, cell in columns),
                    r["event_type"],
                    r["attempts"],
                    r["last_failed_at"][:19],
                    f"{r['error_type']}: {r['error_message']}"[:70],
                )
                for r in rows
            ],
            ("ID", *(name for name, _ in columns), "EVENT TYPE", "ATTEMPTS", "LAST FAILED",
             "ERROR"),
        )
    )


def show_dead_letter(r: dict[str, Any], keys: tuple[str, ...]) -> None:
    """One dead letter, as ``oxbus dlq show`` prints it: ``keys`` a line each, the event's data
    and metadata as JSON, then the traceback (``--json``: the whole record as one object)."""
    if json_mode():
        emit(r)
        return
    for k in keys:
        click.echo(f"{k + ':':<17}{r[k]}")
    click.echo(f"{'data:':<17}{json.dumps(r['data'], ensure_ascii=False)}")
    click.echo(f"{'metadata:':<17}{json.dumps(r['metadata'], ensure_ascii=False)}")
    click.echo("traceback:")
    click.echo(indent(r["traceback"].rstrip()) if r["traceback"] else "  (none)")


#: what ``oxbus dlq show`` prints of every dead letter, wherever it is kept
DEAD_LETTER_KEYS = (
    "id", "subscription", "attempts", "first_failed_at", "last_failed_at", "error_type",
    "error_message",
)


def indent(text: str) -> str:
    """Every line indented by two spaces."""
    return "  " + text.replace("\n", "\n  ")
