"""The event-flow picture of a durable bus's log: which event types go to which handlers, and
which events those handlers publish, with counts and failure rates.

```python
flow = read_flow("events.db")
print(to_mermaid(flow))            # or to_dot(flow); render(flow, "png") -> bytes
```

Where the numbers come from (tables and views of the SQLite log):

- **event type → handler**: the ``progress`` view lists each (subscription, position) a
  durable subscription finished, dead-lettered pairs included; joined with ``events`` it counts
  deliveries per (event type, subscription). ``dead_letters`` counts failures the same way; the
  failure rate is dead letters / deliveries.
- **handler → event type**: an event published while a handler ran has, in its metadata, the
  handled event's id as ``causation_id`` and the handler's subscription name as
  ``subscription``. Logs written before the name was recorded (or events whose causation was
  set by hand) are attributed to the parent's type: to its only handler when it has one, else
  drawn as a dashed type → type edge.
- **sagas**: a saga's steps are subscriptions named ``Saga.step`` (see ``oxbus.saga``);
  ``saga_instances`` names the sagas, so their steps are drawn together, in a box titled with
  the saga's instances per state. A deadline's event is drawn as published by the step that
  set it, a compensation published when a step gave up as published by that step.

Rendering SVG or PNG runs Graphviz's ``dot`` (``apt-get install graphviz``); Mermaid and DOT
are plain text and need nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import html
import os
import shutil
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from oxbus._oxbus import StoreCore
from oxbus.errors import OxbusError, StorageError

__all__ = ["Flow", "LogReader", "RenderError", "connect", "read_flow", "render", "to_dot", "to_mermaid"]

TABLES = ("events", "progress", "subscriptions", "dead_letters")

T = TypeVar("T")


class RenderError(OxbusError):
    """SVG or PNG was asked for and Graphviz's ``dot`` is missing or failed."""


def _run(work: Callable[[], Awaitable[T]]) -> T:
    """Runs ``work()`` to completion from synchronous code: on a loop of its own, in a worker
    thread when this thread already runs one (``read_flow`` called inside a running bus)."""

    async def go() -> T:
        return await work()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


class LogReader:
    """An existing oxbus log opened through oxbus's own SQLite (the store's engine), for the
    admin commands and the picture: read-only unless ``write``, never creating a file.

    Never Python's ``sqlite3``: a second copy of SQLite in a bus's process has its own lock
    bookkeeping, and closing it can make the bus's WAL vanish (see "Reading the log while a bus
    runs" in the README). Read-only opening works in a read-only directory. Queries are read-only
    SQL statements.

    ```python
    with LogReader("events.db") as log:
        (n,) = log.query("SELECT COUNT(*) FROM events")[0]
    ```
    """

    def __init__(self, path: str | os.PathLike[str], *, write: bool = False) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise StorageError(f"{self.path}: no such file")
        # A writable open would create the schema in any SQLite file: check it first.
        self._core = StoreCore(self.path, "normal", True)
        if write:
            self._core.close()
            self._core = StoreCore(self.path, "normal", False)

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> LogReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def many(self, statements: list[tuple[str, tuple[Any, ...]]]) -> list[list[tuple[Any, ...]]]:
        """The rows of each read-only statement, read in one go."""

        async def work() -> list[list[tuple[Any, ...]]]:
            return [await self._core.query(sql, list(args)) for sql, args in statements]

        return _run(work)

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only statement."""
        return self.many([(sql, args)])[0]

    def requeue_dead_letters(self, ids: list[int] | None) -> list[tuple[int, str, int]]:
        """Removes dead letters (all with None) and the record that their subscription
        finished their event, so the next start delivers it again (see ``oxbus dlq retry``)."""

        async def work() -> list[tuple[int, str, int]]:
            return list(await self._core.requeue_dead_letters(ids))

        return _run(work)

    def purge_dead_letters(self) -> int:
        """Deletes every dead letter; returns how many."""

        async def work() -> int:
            return int(await self._core.remove_dead_letters(None))

        return _run(work)


def connect(path: str | os.PathLike[str], *, write: bool = False) -> LogReader:
    """Opens an existing oxbus log (read-only unless ``write``) through oxbus's own SQLite.

    Never creates a file: a missing path, a file that is not SQLite, or a database without the
    log's tables raises ``StorageError``.
    """
    try:
        return LogReader(path, write=write)
    except StorageError as e:
        msg = str(e)
        if msg.startswith(os.fspath(path)):
            raise
        raise StorageError(f"{os.fspath(path)}: cannot open: {msg}") from e


@dataclass
class Flow:
    """Counts read from a log. Keys are event types and subscription names."""

    #: events in the log per type
    events: dict[str, int] = field(default_factory=dict)
    #: (event type, subscription) -> deliveries finished (dead-lettered ones included)
    deliveries: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (event type, subscription) -> dead letters
    dead_letters: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (subscription, event type) -> events published while that subscription ran
    published: dict[tuple[str, str], int] = field(default_factory=dict)
    #: (parent type, child type) -> events caused by a parent whose handler is not known
    caused: dict[tuple[str, str], int] = field(default_factory=dict)
    #: event type -> positions of its rows whose data or metadata is not valid JSON (counted
    #: in ``events``, left out of the causation edges)
    undecodable: dict[str, list[int]] = field(default_factory=dict)
    #: a title for the picture (the file name)
    title: str = ""
    #: saga name -> {state: instances}
    sagas: dict[str, dict[str, int]] = field(default_factory=dict)

    def saga_of(self, subscription: str) -> str | None:
        """The saga whose step ``subscription`` is, if any."""
        for name in self.sagas:
            if subscription.startswith(f"{name}."):
                return name
        return None

    @property
    def handlers(self) -> list[str]:
        """Every subscription that appears, in a stable order."""
        names = {s for _, s in self.deliveries} | {s for _, s in self.dead_letters}
        names |= {s for s, _ in self.published}
        return sorted(names)

    def failure_rate(self, event_type: str, subscription: str) -> float:
        dead = self.dead_letters.get((event_type, subscription), 0)
        n = max(self.deliveries.get((event_type, subscription), 0), dead)
        return dead / n if n else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: nodes and edges with their counts."""
        edges: list[dict[str, Any]] = []
        for t, s in sorted(set(self.deliveries) | set(self.dead_letters)):
            dead = self.dead_letters.get((t, s), 0)
            edges.append(
                {
                    "from": t,
                    "to": s,
                    "kind": "delivered",
                    "count": max(self.deliveries.get((t, s), 0), dead),
                    "dead_letters": dead,
                    "failure_rate": round(self.failure_rate(t, s), 4),
                }
            )
        for (s, t), n in sorted(self.published.items()):
            edges.append({"from": s, "to": t, "kind": "published", "count": n})
        for (p, c), n in sorted(self.caused.items()):
            edges.append({"from": p, "to": c, "kind": "caused", "count": n})
        return {
            "event_types": [{"name": t, "count": n} for t, n in sorted(self.events.items())],
            "handlers": [
                {
                    "name": s,
                    "deliveries": sum(n for (_, h), n in self.deliveries.items() if h == s),
                    "dead_letters": sum(n for (_, h), n in self.dead_letters.items() if h == s),
                }
                for s in self.handlers
            ],
            "edges": edges,
            "undecodable": [
                {"event_type": t, "count": len(ps), "positions": ps[:100]}
                for t, ps in sorted(self.undecodable.items())
            ],
            "sagas": [
                {
                    "name": name,
                    "steps": [h for h in self.handlers if self.saga_of(h) == name],
                    "instances": dict(sorted(states.items())),
                }
                for name, states in sorted(self.sagas.items())
            ],
        }


# Causation, from the metadata; rows whose metadata is not valid JSON are left out.
_CHILDREN = """
SELECT p.event_type, json_extract(c.metadata, '$.subscription'), c.event_type, COUNT(*)
FROM events c JOIN events p
  ON p.event_id = CASE WHEN json_valid(c.metadata) THEN json_extract(c.metadata, '$.causation_id') END
GROUP BY 1, 2, 3"""


def read_flow(path: str | os.PathLike[str]) -> Flow:
    """Reads the counts of the picture from the log at ``path`` (see the module docstring),
    through oxbus's own SQLite, so it is safe inside a running bus's process."""
    with connect(path) as log:
        types, deliveries, dead, children, bad = log.many(
            [
                ("SELECT event_type, COUNT(*) FROM events GROUP BY 1", ()),
                (
                    """SELECT e.event_type, p.subscription, COUNT(*)
                       FROM progress p JOIN events e ON e.position = p.position GROUP BY 1, 2""",
                    (),
                ),
                (
                    """SELECT e.event_type, d.subscription, COUNT(*)
                       FROM dead_letters d JOIN events e ON e.position = d.position GROUP BY 1, 2""",
                    (),
                ),
                (_CHILDREN, ()),
                (
                    """SELECT event_type, position FROM events
                       WHERE NOT json_valid(data) OR NOT json_valid(metadata) ORDER BY position""",
                    (),
                ),
            ]
        )
        sagas = (
            log.query("SELECT saga, status, COUNT(*) FROM saga_instances GROUP BY 1, 2")
            if log.query("SELECT 1 FROM sqlite_master WHERE name = 'saga_instances'")
            else []
        )
    flow = Flow(title=os.path.basename(os.fspath(path)))
    for saga, status, n in sagas:
        flow.sagas.setdefault(saga, {})[status] = n
    flow.events = {t: n for t, n in types}
    flow.deliveries = {(t, s): n for t, s, n in deliveries}
    flow.dead_letters = {(t, s): n for t, s, n in dead}
    for t, pos in bad:
        flow.undecodable.setdefault(t, []).append(pos)
    handlers_of: dict[str, set[str]] = defaultdict(set)
    for t, s in list(flow.deliveries) + list(flow.dead_letters):
        handlers_of[t].add(s)
    published: dict[tuple[str, str], int] = defaultdict(int)
    caused: dict[tuple[str, str], int] = defaultdict(int)
    for parent, sub, child, n in children:
        if sub is None and len(handlers_of[parent]) == 1:
            sub = next(iter(handlers_of[parent]))
        if sub is None:
            caused[(parent, child)] += n
        else:
            published[(str(sub), child)] += n
            if parent not in flow.events:
                flow.events[parent] = 0
    flow.published = dict(published)
    flow.caused = dict(caused)
    return flow


# ------------------------------------------------------------------------- drawing

EVENT_FILL, EVENT_LINE = "#dbe9f8", "#3b6ea8"
HANDLER_FILL, HANDLER_LINE = "#fdf0d0", "#a8791f"
FAIL = "#c0392b"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _delivery_label(flow: Flow, t: str, s: str, sep: str) -> tuple[str, bool]:
    dead = flow.dead_letters.get((t, s), 0)
    n = max(flow.deliveries.get((t, s), 0), dead)
    if not dead:
        return f"{n:,} delivered", False
    return (
        f"{n:,} delivered{sep}{_plural(dead, 'dead letter')} ({flow.failure_rate(t, s):.0%})",
        True,
    )


def _saga_title(flow: Flow, saga: str) -> str:
    states = flow.sagas[saga]
    total = sum(states.values())
    parts = ", ".join(f"{n:,} {s}" for s, n in sorted(states.items()))
    return f"saga {saga}: {_plural(total, 'instance')} ({parts})"


def _by_saga(flow: Flow, hd: dict[str, str]) -> dict[str | None, list[tuple[str, str]]]:
    """Handler nodes grouped by the saga they are steps of (None: plain handlers)."""
    groups: dict[str | None, list[tuple[str, str]]] = {}
    for name, i in hd.items():
        groups.setdefault(flow.saga_of(name), []).append((name, i))
    return groups


def _ids(flow: Flow) -> tuple[dict[str, str], dict[str, str]]:
    events = {t: f"e{i}" for i, t in enumerate(sorted(flow.events))}
    handlers = {s: f"h{i}" for i, s in enumerate(flow.handlers)}
    return events, handlers


def to_mermaid(flow: Flow) -> str:
    """A Mermaid flowchart (left to right): event types as rounded boxes with their counts,
    handlers as subroutine boxes; failing deliveries in red."""

    def q(text: str) -> str:
        return text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")

    ev, hd = _ids(flow)
    lines = ["flowchart LR"]
    for t, i in ev.items():
        lines.append(f'    {i}(["{q(t)}<br/>{_plural(flow.events[t], "event")}"]):::event')
    for saga, handlers in _by_saga(flow, hd).items():
        if saga is not None:
            n = sorted(flow.sagas).index(saga)
            lines.append(f'    subgraph s{n}["{q(_saga_title(flow, saga))}"]')
        for s, i in handlers:
            lines.append(f'    {"  " if saga else ""}{i}[["{q(s)}"]]:::handler')
        if saga is not None:
            lines.append("    end")
    red: list[int] = []
    n = 0
    for t, s in sorted(set(flow.deliveries) | set(flow.dead_letters)):
        label, failing = _delivery_label(flow, t, s, ", ")
        lines.append(f'    {ev[t]} -->|"{q(label)}"| {hd[s]}')
        if failing:
            red.append(n)
        n += 1
    for (s, t), count in sorted(flow.published.items()):
        lines.append(f'    {hd[s]} -->|"{count:,} published"| {ev[t]}')
        n += 1
    for (p, c), count in sorted(flow.caused.items()):
        lines.append(f'    {ev[p]} -.->|"{count:,} caused"| {ev[c]}')
        n += 1
    lines.append(f"    classDef event fill:{EVENT_FILL},stroke:{EVENT_LINE},color:#10243e")
    lines.append(f"    classDef handler fill:{HANDLER_FILL},stroke:{HANDLER_LINE},color:#3d2c06")
    if red:
        lines.append(
            f"    linkStyle {','.join(map(str, red))} stroke:{FAIL},color:{FAIL},stroke-width:2px"
        )
    return "\n".join(lines) + "\n"


def to_dot(flow: Flow) -> str:
    """A Graphviz digraph, left to right, with counts on every edge; failing deliveries red and
    edges thicker the more events they carry."""

    def s(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    ev, hd = _ids(flow)
    counts = (
        list(flow.deliveries.values()) + list(flow.published.values()) + list(flow.caused.values())
    )
    top = max(counts, default=1) or 1

    def width(n: int) -> str:
        return f"{1.0 + 2.0 * n / top:.2f}"

    title = f"oxbus event flow — {flow.title}" if flow.title else "oxbus event flow"
    legend = (
        "event types (blue, with their count) → handlers (amber) → the events they "
        "published; red: dead letters / deliveries"
    )
    out = [
        "digraph oxbus_flow {",
        "    rankdir=LR; nodesep=0.4; ranksep=1.1; pad=0.3;",
        (
            f'    graph [fontname="Helvetica", fontsize=18, labelloc=t, labeljust=l, '
            f'label=<<B>{html.escape(title)}</B><BR ALIGN="LEFT"/>'
            f'<FONT POINT-SIZE="11" COLOR="#555555">{html.escape(legend)}</FONT>'
            '<BR ALIGN="LEFT"/> >];'
        ),
        '    node [fontname="Helvetica", fontsize=13, margin="0.2,0.1"];',
        '    edge [fontname="Helvetica", fontsize=11, color="#5b6770", fontcolor="#333333", arrowsize=0.8];',
    ]
    for t, i in ev.items():
        out.append(
            f'    {i} [shape=box, style="rounded,filled", fillcolor="{EVENT_FILL}", color="{EVENT_LINE}", '
            f'penwidth=1.5, label=<<B>{html.escape(t)}</B><BR/><FONT POINT-SIZE="11">'
            f"{_plural(flow.events[t], 'event')}</FONT>>];"
        )
    for saga, handlers in _by_saga(flow, hd).items():
        pad = "    "
        if saga is not None:
            n = sorted(flow.sagas).index(saga)
            out.append(
                f"    subgraph cluster_s{n} {{ label={s(_saga_title(flow, saga))}; "
                f'style="rounded,dashed"; color="{HANDLER_LINE}"; fontsize=12;'
            )
            pad = "        "
        for name, i in handlers:
            out.append(
                f'{pad}{i} [shape=box, style=filled, fillcolor="{HANDLER_FILL}", '
                f'color="{HANDLER_LINE}", label=<<I>{html.escape(name)}</I>>];'
            )
        if saga is not None:
            out.append("    }")
    for t, name in sorted(set(flow.deliveries) | set(flow.dead_letters)):
        label, failing = _delivery_label(flow, t, name, "\n")
        n = max(flow.deliveries.get((t, name), 0), flow.dead_letters.get((t, name), 0))
        style = f', color="{FAIL}", fontcolor="{FAIL}"' if failing else ""
        out.append(f"    {ev[t]} -> {hd[name]} [label={s(label)}, penwidth={width(n)}{style}];")
    for (name, t), n in sorted(flow.published.items()):
        out.append(
            f"    {hd[name]} -> {ev[t]} [label={s(f'{n:,} published')}, penwidth={width(n)}];"
        )
    for (p, c), n in sorted(flow.caused.items()):
        out.append(
            f"    {ev[p]} -> {ev[c]} [label={s(f'{n:,} caused')}, style=dashed, penwidth={width(n)}];"
        )
    out.append("}")
    return "\n".join(out) + "\n"


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` is on PATH."""
    return shutil.which("dot") is not None


def render(flow: Flow, fmt: str, *, dpi: int = 110) -> bytes:
    """SVG or PNG bytes of [`to_dot`][oxbus.flow.to_dot], drawn by Graphviz's ``dot``."""
    if fmt not in ("svg", "png"):
        raise ValueError(f"render draws 'svg' or 'png', got {fmt!r}")
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError(
            f"drawing {fmt} needs Graphviz's `dot` on PATH (apt-get install graphviz, "
            "brew install graphviz); --format mermaid and dot need nothing"
        )
    args = [exe, f"-T{fmt}"] + ([f"-Gdpi={dpi}"] if fmt == "png" else [])
    try:
        p = subprocess.run(args, input=to_dot(flow).encode(), capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RenderError(f"dot failed: {e}") from e
    if p.returncode != 0:
        raise RenderError(
            f"dot failed ({p.returncode}): {p.stderr.decode(errors='replace').strip()}"
        )
    return p.stdout
