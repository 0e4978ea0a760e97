"""Reading the log DB for the commands: the DB argument and the event filters they share, the
connection (a missing file or a foreign one is exit code 3, never created), and the rows of
the log, page by page, through oxbus's own SQLite (never Python's ``sqlite3``: ``main()`` may
run inside a bus's process, where a second copy of SQLite could make the bus's WAL vanish).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import click

from oxbus.cli._output import UNREACHABLE, fail
from oxbus.errors import StorageError

if TYPE_CHECKING:
    from oxbus.flow import LogReader
    from oxbus.store import SqliteEventStore

T = TypeVar("T")

#: Rows read from the log at a time.
PAGE = 1000

db_argument = click.argument("db", type=click.Path(dir_okay=False))


def event_filters(f: Any) -> Any:
    """The ``--stream``, ``--type`` and ``--after`` options of the commands that read events."""
    for option in reversed(
        (
            click.option("--stream", help="Only this stream (a durable bus writes `$bus:<key>`)."),
            click.option("--type", "event_type", help="Only this event type."),
            click.option(
                "--after",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Only events after this position.",
            ),
        )
    ):
        f = option(f)
    return f


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, also when called from a running loop (``main()`` used as a library):
    then the coroutine runs on a loop of its own in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def connect(db: str, *, write: bool = False) -> LogReader:
    """The log DB; exit code 3 when it is missing or not an oxbus log (it is never created)."""
    from oxbus.flow import connect

    try:
        return connect(db, write=write)
    except StorageError as e:
        fail(str(e), UNREACHABLE)


def query(log: LogReader, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """``log.query``; exit code 3 when the file cannot be read."""
    try:
        return log.query(sql, args)
    except StorageError as e:
        fail(str(e), UNREACHABLE)


def json_or_raw(text: str | None) -> Any:
    """A stored JSON column decoded, or (not valid JSON) the text itself, marked."""
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as e:
        return {"undecodable": f"{type(e).__name__}: {e}", "raw": text[:200]}


async def stored_rows(
    store: SqliteEventStore,
    *,
    after: int,
    stream: str | None,
    event_type: str | None,
    poll: float | None = None,
) -> AsyncGenerator[tuple[Any, ...], None]:
    """The raw rows of the log after position ``after`` that match the filters, oldest first
    (``store._row(r)`` decodes one). With ``poll``, keeps reading the file every ``poll``
    seconds for rows another process commits, until the caller stops."""
    pos = after
    while True:
        while True:
            page = await store._core.read_all(pos, PAGE)
            for r in page:
                pos = r[0]
                if (stream is None or r[1] == stream) and (
                    event_type is None or r[3] == event_type
                ):
                    yield r
            if len(page) < PAGE:
                break
        if poll is None:
            return
        await asyncio.sleep(poll)  # polling the file: another process writes it
