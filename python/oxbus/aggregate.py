"""A small event-sourced aggregate and repository on top of
[`SqliteEventStore`][oxbus.SqliteEventStore].

```python
class Account(Aggregate):
    balance = 0

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount))

    def on_Deposited(self, e: Deposited) -> None:   # one method per event class
        self.balance += e.amount

repo = Repository(store, Account, snapshot_every=100)
account = await repo.load("acc-1")   # snapshot + later events
account.deposit(10)
await repo.save(account)             # append with expected_version: ConcurrencyError on a race
```
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from oxbus.store import SqliteEventStore

__all__ = ["Aggregate", "Repository"]

A = TypeVar("A", bound="Aggregate")


class Aggregate:
    """State rebuilt from events. ``record(event)`` applies a new event and keeps it until the
    repository saves it; ``apply`` calls ``on_<EventClassName>(event)``."""

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0
        self._pending: list[Any] = []

    def apply(self, event: Any) -> None:
        handler = getattr(self, f"on_{type(event).__name__}", None)
        if handler is None:
            raise TypeError(f"{type(self).__name__} has no on_{type(event).__name__} method")
        handler(event)

    def record(self, event: Any) -> None:
        """Applies a new event and queues it for ``Repository.save``."""
        self.apply(event)
        self._pending.append(event)

    @property
    def pending(self) -> list[Any]:
        """Recorded events not yet saved."""
        return list(self._pending)

    def snapshot_state(self) -> dict[str, Any]:
        """The state to snapshot: public attributes but ``id`` and ``version``."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("id", "version")}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Restores ``snapshot_state()`` output."""
        vars(self).update(state)


class Repository(Generic[A]):
    """Loads and saves one aggregate class in a store, stream ``"<ClassName>-<id>"``."""

    def __init__(self, store: SqliteEventStore, cls: type[A], *, snapshot_every: int | None = None) -> None:
        if snapshot_every is not None and snapshot_every < 1:
            raise ValueError(f"snapshot_every must be >= 1, got {snapshot_every!r}")
        self.store, self.cls, self.snapshot_every = store, cls, snapshot_every

    def stream_id(self, aggregate_id: str) -> str:
        return f"{self.cls.__name__}-{aggregate_id}"

    async def load(self, aggregate_id: str) -> A:
        """The aggregate from its latest snapshot plus the events after it (new if none)."""
        agg = self.cls(aggregate_id)
        stream = self.stream_id(aggregate_id)
        snap = await self.store.load_snapshot(stream)
        if snap is not None:
            agg.restore_state(snap.state)
            agg.version = snap.version
        for stored in await self.store.read(stream, after_version=agg.version):
            agg.apply(stored.event)
            agg.version = stored.version
        return agg

    async def save(self, agg: A) -> int:
        """Appends the pending events, expecting the version it was loaded at; raises
        ``ConcurrencyError`` if another writer saved first. Returns the new version."""
        if not agg._pending:
            return agg.version
        stream = self.stream_id(agg.id)
        before = agg.version
        agg.version = await self.store.append(stream, agg._pending, expected_version=before)
        agg._pending.clear()
        every = self.snapshot_every
        if every is not None and agg.version // every > before // every:
            await self.store.save_snapshot(stream, agg.version, agg.snapshot_state())
        return agg.version
