"""``SqliteEventStore``: an event store on SQLite with optimistic concurrency, snapshots and
upcasting. Every read and write is a coroutine that runs on the store's own thread; the asyncio
thread only encodes and decodes.

```python
async with SqliteEventStore("events.db") as store:
    version = await store.append("account-1", [Deposited(100)], expected_version=0)
    for stored in await store.read("account-1"):
        print(stored.version, stored.event)
```
"""

from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Iterable

from oxbus import registry
from oxbus._oxbus import StoreCore, decode_json, encode_json
from oxbus.errors import ConfigurationError, UndecodableEvent

__all__ = ["Snapshot", "SqliteEventStore", "StoredEvent"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _parse_time(s: str | None) -> datetime | None:
    return None if s is None else datetime.fromisoformat(s)


@dataclass(frozen=True)
class StoredEvent:
    """One event of the log, as stored (after upcasting)."""

    position: int
    stream_id: str
    version: int
    event_type: str
    event_version: int
    data: dict[str, Any]
    metadata: dict[str, Any]
    event_id: str
    occurred_at: datetime | None
    recorded_at: datetime
    _store: Any = field(default=None, repr=False, compare=False)

    @property
    def correlation_id(self) -> Any:
        return self.metadata.get("correlation_id")

    @property
    def causation_id(self) -> Any:
        return self.metadata.get("causation_id")

    @property
    def event(self) -> Any:
        """The user's class rebuilt through the registry (``oxbus.register_event``; automatic
        for ``DomainEvent`` subclasses), else the data dict."""
        return _rebuilt(
            self.position, self.event_type, self.data, self.metadata, self.event_id,
            self.occurred_at,
        )


def _rebuilt(
    position: int, event_type: str, data: dict[str, Any], metadata: dict[str, Any],
    event_id: str, occurred_at: datetime | None,
) -> Any:
    """A stored event's object: its class rebuilt from ``data`` with its identity (id, time,
    correlation, causation) restored, or ``data`` when no class is registered for the type."""
    cls = registry.lookup(event_type)
    if cls is None:
        return data
    try:
        obj: Any = registry.rebuild(cls, data)
    except Exception as e:  # fields the class does not take and no upcaster fixed
        raise UndecodableEvent(
            position, event_type, f"{cls.__qualname__} refuses its data: {type(e).__name__}: {e}"
        ) from e
    d = getattr(obj, "__dict__", None)
    if d is not None and getattr(cls, "__oxbus_domain_event__", False):
        d["event_id"] = event_id
        if occurred_at is not None:
            d["occurred_at"] = occurred_at
        for k in ("correlation_id", "causation_id"):
            if metadata.get(k) is not None:
                d[k] = metadata[k]
    return obj


@dataclass(frozen=True)
class Snapshot:
    """An aggregate's saved state at a stream version."""

    stream_id: str
    version: int
    state: Any
    taken_at: datetime


_open_stores: weakref.WeakSet[SqliteEventStore] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    # Stop every writer thread before CPython finalizes.
    for store in list(_open_stores):
        store.close()


class SqliteEventStore:
    """An event store in one SQLite file (``":memory:"`` for a private one), WAL mode.

    ``synchronous="normal"`` survives a process crash; ``"full"`` survives power loss.
    ``read_only=True`` opens an existing log without ever writing to it (also in a read-only
    directory); writes then raise ``StorageError``.
    Methods are coroutines except ``close()``, ``register_upcaster`` and the context managers.
    A row that cannot be decoded raises ``UndecodableEvent`` naming its position.
    """

    def __init__(
        self, path: str = ":memory:", *, synchronous: str = "normal", read_only: bool = False
    ) -> None:
        if not isinstance(path, str):
            path = str(path)  # os.PathLike
        if not path:
            raise ConfigurationError(
                "path must name a file (or be \":memory:\" for a private in-memory store), got ''"
            )
        self.path = path
        self._core = StoreCore(path, synchronous, read_only)
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        _open_stores.add(self)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Finishes queued work and releases the file at once. Idempotent."""
        self._core.close()

    @property
    def closed(self) -> bool:
        return bool(self._core.closed)

    def __enter__(self) -> SqliteEventStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SqliteEventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SqliteEventStore({self.path!r}{', closed' if self.closed else ''})"

    # ------------------------------------------------------------------- writing

    async def append(
        self, stream_id: str, events: Iterable[Any], expected_version: int | None = None
    ) -> int:
        """Appends ``events`` to ``stream_id`` atomically; returns the stream's new version.

        ``expected_version`` is the stream's version before the append (0 for a new stream);
        when another writer got there first this raises ``ConcurrencyError`` and writes
        nothing. An event that cannot be encoded raises ``SerializationError`` and nothing is
        written.
        """
        if not isinstance(stream_id, str) or not stream_id:
            raise ConfigurationError(f"stream_id must be a non-empty str, got {stream_id!r}")
        batch = list(events)
        if not batch:
            raise ConfigurationError("append needs at least one event")
        version, _ = await self._core.append(stream_id, batch, expected_version)
        return int(version)

    async def save_snapshot(self, stream_id: str, version: int, state: Any) -> None:
        """Saves (replacing) the snapshot of ``stream_id`` at ``version``."""
        await self._core.save_snapshot(stream_id, version, encode_json(state))

    async def load_snapshot(self, stream_id: str) -> Snapshot | None:
        """The latest snapshot of ``stream_id``, or None."""
        row = await self._core.load_snapshot(stream_id)
        if row is None:
            return None
        sid, version, state, taken = row
        return Snapshot(sid, version, decode_json(state), datetime.fromisoformat(taken))

    # ------------------------------------------------------------------- reading

    def register_upcaster(self, event_type: str, from_version: int, fn: Upcaster) -> None:
        """Registers ``fn(data) -> data`` turning ``event_type`` v``from_version`` into
        v``from_version + 1``. Reads apply the chain up to the newest version."""
        if not callable(fn):
            raise ConfigurationError(f"upcaster must be callable, got {fn!r}")
        key = (event_type, from_version)
        if key in self._upcasters:
            raise ConfigurationError(f"an upcaster for {event_type} v{from_version} is already registered")
        self._upcasters[key] = fn

    def _decoded(
        self, position: int, event_type: str, event_version: int, data: str, meta: str,
        occ: str | None,
    ) -> tuple[Any, int, dict[str, Any], datetime | None]:
        """A row's data (upcast to the latest version), that version, its metadata and
        when it occurred."""
        try:
            body = decode_json(data)
            upcasters = self._upcasters
            while (event_type, event_version) in upcasters:
                body = upcasters[(event_type, event_version)](body)
                event_version += 1
            return body, event_version, decode_json(meta), _parse_time(occ)
        except Exception as e:
            raise UndecodableEvent(position, event_type, f"{type(e).__name__}: {e}") from e

    def _row(self, r: tuple[Any, ...]) -> StoredEvent:
        position, stream_id, version, event_type, event_version, data, meta, event_id, occ, rec = r
        body, event_version, metadata, occurred = self._decoded(
            position, event_type, event_version, data, meta, occ
        )
        try:
            recorded = datetime.fromisoformat(rec)
        except Exception as e:
            raise UndecodableEvent(position, event_type, f"{type(e).__name__}: {e}") from e
        return StoredEvent(
            position, stream_id, version, event_type, event_version, body, metadata,
            event_id, occurred, recorded, self,
        )

    def _event_or_none(self, row: tuple[Any, ...] | None) -> Any:
        """The event of a row rebuilt, or None when there is no row or it cannot be decoded."""
        if row is None:
            return None
        try:
            return self._row(row).event
        except UndecodableEvent:
            return None

    async def _undelivered(
        self, subscription: str, start_after: int, target: Any
    ) -> list[tuple[int, Any, Any, Any]]:
        """A durable subscription's committed events it has not finished, as (position,
        event, correlation id, causation id): only what redelivery needs is decoded (no
        ``StoredEvent``, no times but the event's own).

        A row that cannot be decoded never stops the others: when the subscription's target
        takes its type it becomes a dead letter of the subscription (its position, the error
        type ``oxbus.errors.UndecodableEvent`` and the reason), and either way it is recorded
        as finished, so the next start does not trip on it again.
        """
        out: list[tuple[int, Any, Any, Any]] = []
        for row in await self._core.undelivered(subscription, start_after):
            position, _, _, event_type, event_version, data, meta, event_id, occ, _ = row
            try:
                body, _, metadata, occurred = self._decoded(
                    position, event_type, event_version, data, meta, occ
                )
                event = _rebuilt(position, event_type, body, metadata, event_id, occurred)
                out.append(
                    (position, event, metadata.get("correlation_id"), metadata.get("causation_id"))
                )
            except UndecodableEvent as e:
                if target is not None and registry.matches(target, event_type):
                    now = datetime.now(timezone.utc).isoformat()
                    await self._core.add_dead_letter(
                        position, subscription, 0, now, now, "oxbus.errors.UndecodableEvent",
                        str(e), "",
                    )
                self._core.mark_done(subscription, position)
        return out

    async def read(self, stream_id: str, after_version: int = 0) -> list[StoredEvent]:
        """Events of ``stream_id`` after ``after_version``, oldest first."""
        return [self._row(r) for r in await self._core.read(stream_id, after_version)]

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Up to ``limit`` events after ``after_position``, in commit order."""
        return [self._row(r) for r in await self._core.read_all(after_position, limit)]

    async def replay(self, after_position: int = 0, batch_size: int = 1000) -> AsyncIterator[StoredEvent]:
        """Every event after ``after_position``, in order, read ``batch_size`` at a time."""
        pos = after_position
        while True:
            rows = await self.read_all(pos, batch_size)
            for r in rows:
                yield r
            if len(rows) < batch_size:
                return
            pos = rows[-1].position

    def __aiter__(self) -> AsyncIterator[StoredEvent]:
        return self.replay()

    async def version(self, stream_id: str) -> int:
        """The stream's current version (0 when empty)."""
        rows = await self._core.read(stream_id, 0)
        return int(rows[-1][2]) if rows else 0
