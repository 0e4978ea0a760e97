"""The ``oxbus`` command line (also ``python -m oxbus``), built on click: one module per command
(``events``, ``dlq``, ``replay``, ``health``, ``stats``, ``flow``, ``sagas``, ``demo``), what
they print in ``_output``, how they read the log in ``_db``.

Every subcommand has ``--help`` and ``--json``. Exit codes scripts can rely on:

====  ==================================================================================
0     done
1     done, and the answer is negative: ``events`` matched nothing, ``dlq show|retry ID``
      found no such dead letter, ``replay`` saw a handler raise, ``health`` is degraded or
      stopped, ``flow`` found no events, ``sagas`` found no instance, ``dlq purge`` was
      declined
2     usage error: unknown option, bad value, ``replay --to`` that cannot be imported
3     cannot reach: the DB file is missing or not an oxbus log, the health URL does not
      answer, or ``flow`` needs Graphviz's ``dot`` for svg/png and it is missing
====  ==================================================================================

``--json`` is accepted before the subcommand (``oxbus --json stats DB``) and after it
(``oxbus stats DB --json``). Standard output then carries only JSON: one object for a single
result, JSON Lines for a stream (``events``, ``dlq list``, ``sagas``), and for an error one
line ``{"error": {"type": ..., "message": ..., "exit_code": ...}}`` with that non-zero exit
code.
``health`` and ``replay`` print their report also when they exit 1 (not healthy, a handler
raised): the report is the answer.

Everything is read through oxbus's own SQLite (``oxbus.flow.LogReader`` and a read-only
``SqliteEventStore``), never Python's ``sqlite3``: ``main()`` may run inside a bus's process,
where a second copy of SQLite could make the bus's WAL vanish. Reading never writes the file
(it works in a read-only directory); only ``dlq retry|purge`` write. A row that cannot be
decoded is shown as undecodable, with its position and the reason.
"""

from __future__ import annotations

import click

from oxbus._oxbus import __version__
from oxbus.cli import demo, dlq, events, flow, health, replay, sagas, stats
from oxbus.cli._output import Cli, json_option

__all__ = ["main"]


@click.group(
    cls=Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(__version__, prog_name="oxbus")
@json_option
def main() -> None:
    """oxbus: look into a durable bus's SQLite log, manage its dead letters, replay it,
    draw its event flow, list its saga instances, check a running bus's health.

    \b
    Exit codes: 0 done; 1 done with a negative answer (nothing matched, a handler raised,
    bus not healthy, no such dead letter); 2 usage error; 3 DB or URL unreachable.
    --json (before or after the subcommand): one JSON object per result, JSON Lines for
    events, dlq list and sagas, errors as {"error": {"type", "message", "exit_code"}}.
    """


# The modules keep their names (``oxbus.cli.replay`` is the module, its command is
# ``oxbus.cli.replay.replay``).
for _command in (
    demo.demo,
    events.events,
    dlq.dlq,
    replay.replay,
    health.health,
    stats.stats,
    flow.flow,
    sagas.sagas,
):
    main.add_command(_command)
