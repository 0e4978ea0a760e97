"""Saga instances on a durable bus: kept in the bus's SQLite file (tables ``saga_instances``,
``saga_applied``, ``saga_deadlines``; see ``src/store/saga.rs``).

A change is one ``StoreCore.saga_write``: the instance row, the reference of the event applied,
the instance's deadlines, the events the step published (appended to the log) and the progress
mark of the event, in one transaction. Reads go through the store's read-only ``query``.
Events kept with an instance (compensations, deadlines) are stored as ``{"type", "data"}`` and
rebuilt through the registry (``oxbus.register_event``; automatic for ``DomainEvent``
subclasses), else kept as the dict.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from oxbus._oxbus import decode_json, encode_json
from oxbus._saga_runtime import Applied, Cause, Change, Instance, type_key_of

if TYPE_CHECKING:
    from oxbus._saga_runtime import Runner
    from oxbus.store import SqliteEventStore

__all__ = ["DurableBook", "decode_event", "encode_event"]

_COLUMNS = (
    "key, status, step, state, compensations, error, correlation_id, steps, compensated, "
    "started_at, updated_at"
)


def encode_event(event: Any, cause: Cause = None) -> str:
    """An event kept with an instance, as JSON (with the step that set it, for a deadline)."""
    stored: dict[str, Any] = {"type": type_key_of(event), "data": event}
    if cause is not None:
        stored["cause"] = list(cause)
    return encode_json(stored)


def decode_event(stored: Any) -> Any:
    """An event kept with an instance, rebuilt (a dict when its type is not registered)."""
    from oxbus.registry import lookup, rebuild

    if isinstance(stored, str):
        stored = decode_json(stored)
    data = stored.get("data")
    cls = lookup(stored.get("type"))
    if cls is None:
        if isinstance(data, dict):
            data.setdefault("event_type", stored.get("type"))
        return data
    return rebuild(cls, data)


def _time(s: str | None) -> datetime | None:
    return None if s is None else datetime.fromisoformat(s)


def instance_of(row: tuple[Any, ...]) -> Instance:
    """An instance from a row of ``_COLUMNS`` (without its applied references and deadlines)."""
    key, status, step, state, comps, error, corr, steps, compensated, started, updated = row
    return Instance(
        key=key,
        status=status,
        step=step,
        state=decode_json(state),
        compensations=[decode_event(c) for c in decode_json(comps)],
        error=error,
        correlation_id=corr,
        steps=steps,
        compensated=bool(compensated),
        started_at=_time(started),
        updated_at=_time(updated),
    )


class DurableBook:
    """Instances in the bus's store."""

    durable = True

    def __init__(self, store: SqliteEventStore) -> None:
        self.store = store

    async def _fill(
        self, name: str, found: dict[str, Instance], where: str, args: list[Any]
    ) -> None:
        """Adds applied references and deadlines to running instances ``found``."""
        core = self.store._core
        for key, ref in await core.query(
            f"SELECT a.key, a.event FROM saga_applied a JOIN saga_instances i "
            f"ON i.saga = a.saga AND i.key = a.key WHERE a.saga = ? {where}",
            [name, *args],
        ):
            if key in found:
                found[key].applied.add(ref)
        for key, dname, due, event in await core.query(
            f"SELECT d.key, d.name, d.due, d.event FROM saga_deadlines d JOIN saga_instances i "
            f"ON i.saga = d.saga AND i.key = d.key WHERE d.saga = ? {where}",
            [name, *args],
        ):
            if key in found:
                stored = decode_json(event)
                cause = stored.get("cause")
                found[key].deadlines[dname] = (
                    float(due),
                    decode_event(stored),
                    (str(cause[0]), str(cause[1]))
                    if isinstance(cause, list) and len(cause) == 2
                    else None,
                )

    async def load(self, runner: Runner) -> list[Instance]:
        rows = await self.store._core.query(
            f"SELECT {_COLUMNS} FROM saga_instances WHERE saga = ? AND status = 'running'",
            [runner.name],
        )
        found = {r[0]: instance_of(r) for r in rows}
        if found:
            await self._fill(runner.name, found, "AND i.status = 'running'", [])
        return list(found.values())

    async def find(self, runner: Runner, key: str) -> Instance | None:
        rows = await self.store._core.query(
            f"SELECT {_COLUMNS} FROM saga_instances WHERE saga = ? AND key = ?", [runner.name, key]
        )
        if not rows:
            return None
        inst = instance_of(rows[0])
        if inst.status == "running":
            await self._fill(runner.name, {key: inst}, "AND a.key = ?", [key])
        return inst

    async def commit(self, runner: Runner, change: Change) -> list[int] | None:
        after = change.after
        row = (
            after.status,
            after.step,
            encode_json(after.state),
            encode_json([{"type": type_key_of(c), "data": c} for c in after.compensations]),
            after.error,
            after.correlation_id,
            after.steps,
            after.compensated,
        )
        deadlines = [
            (n, due, encode_event(e, cause))
            for n, (due, e, cause) in sorted(after.deadlines.items())
        ]
        cause = change.cause
        positions: list[int] | None = await self.store._core.saga_write(
            runner.name,
            after.key,
            row,
            change.ref,
            deadlines,
            [(e, k, change.correlation_id, cause) for e, k in change.events],
            change.done,
        )
        if positions is None:
            raise Applied(change.ref)
        return positions

    async def instances(self, runner: Runner, state: str | None) -> list[Instance]:
        sql = f"SELECT {_COLUMNS} FROM saga_instances WHERE saga = ?"
        args: list[Any] = [runner.name]
        if state is not None:
            sql += " AND status = ?"
            args.append(state)
        found = {
            r[0]: instance_of(r) for r in await self.store._core.query(sql + " ORDER BY key", args)
        }
        running = {k: i for k, i in found.items() if i.status == "running"}
        if running:
            await self._fill(runner.name, running, "AND i.status = 'running'", [])
        return list(found.values())
