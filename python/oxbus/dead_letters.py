"""The dead-letter queue: ``bus.dead_letters`` lists, retries, discards and purges the
(event, subscription) pairs whose last attempt failed.

```python
for entry in bus.dead_letters:
    print(entry.subscription, entry.error_type, entry.error_message)
await bus.dead_letters.retry()        # all of them, each to its subscription only
```

On a broker bus (RabbitMQ, Redis Streams) the dead letters live on the broker, in the group's
dead-letter queue (``<queue>.dead``) or its entries of the dead-letter stream
(``<stream>:dead``), where every member of the group (and ``oxbus dlq URL``) sees them. The list is
read from there when the bus starts and by ``await bus.dead_letters.refresh()``; the dead
letters this bus writes join it as they happen. ``retry()`` sends dead letters back to the
group (each for the subscription that failed only) and removes them from the broker;
``await clear()`` empties the broker's queue; ``purge()`` and ``discard()`` do the same in the
background.
"""

from __future__ import annotations

import builtins
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Iterator

from oxbus._oxbus import BusCore, TransportCore
from oxbus.errors import InvalidSubscription
from oxbus.store import SqliteEventStore
from oxbus.subscription import Subscription

__all__ = ["DeadLetter", "DeadLetters", "ProcessingResult"]


@dataclass
class ProcessingResult:
    """The outcome of one handler call, as handed to ``event_storage.mark_event_processed``.

    The fields of the pure-Python bus's ``EventProcessingResult``, in its order, plus the
    subscription's name.
    """

    event_id: str
    success: bool
    error_message: str | None = None
    processing_time_ms: float = 0.0
    retry_attempt: int = 0
    subscription: str = ""


@dataclass
class DeadLetter:
    """An (event, subscription) pair whose last attempt failed."""

    id: str
    event: Any
    subscription: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    error_type: str
    error_message: str
    traceback: str
    final_result: ProcessingResult = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    subscription_id: str = field(repr=False, compare=False, default="")
    position: int | None = field(repr=False, compare=False, default=None)
    #: the key's lane hash when the subscription parks its keys behind dead letters
    key_hash: int | None = field(repr=False, compare=False, default=None)
    #: the id of the dead letter this event is parked behind (it was never handled)
    parked_behind: str | None = field(repr=False, compare=False, default=None)
    #: the ordering key it was published with (explicit or its aggregate_id)
    key: Any = field(repr=False, compare=False, default=None)
    #: on a broker: what was written beside the message (AMQP headers, stream entry fields),
    #: as text (see :func:`broker_fields`)
    headers: dict[str, str] | None = field(repr=False, compare=False, default=None)


def _time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def _count(text: str | None) -> int:
    """A count written by whoever dead-lettered the message; 0 when it is not one."""
    try:
        return int(text) if text else 0
    except ValueError:
        return 0


def broker_fields(headers: dict[str, str]) -> dict[str, Any]:
    """What a dead letter's fields on the broker (AMQP headers, stream entry fields) say:
    ``subscription`` (``""`` when no handler gave up on it), ``error_type`` (the handler's
    exception; ``oxbus.Refused`` where the bus could not take the message;
    ``rabbitmq.delivery_limit``, ``redis.delivery_limit`` or another reason of the broker's
    where it moved the message there itself), ``error_message``, ``traceback``, ``attempts``,
    ``first_failed_at`` and ``last_failed_at`` (datetimes)."""
    last = _time(headers.get("last_failed_at")) or datetime.now(timezone.utc)
    return {
        "subscription": headers.get("subscription", ""),
        "error_type": headers.get("error_type", "oxbus.Refused"),
        "error_message": headers.get("error_message") or headers.get("error", ""),
        "traceback": headers.get("traceback", ""),
        "attempts": _count(
            headers.get("attempts") or headers.get("deliveries")
            or headers.get("x-delivery-count")
        ),
        "first_failed_at": _time(headers.get("first_failed_at")) or last,
        "last_failed_at": last,
    }


#: a dead letter as ``TransportCore.dead_letters`` reads it from the broker: its id, the queue
#: (or stream) a retry sends it back to, its payload and the fields written beside it
BrokerRow = tuple[str, str, str, dict[str, str]]


def read_broker_row(row: BrokerRow) -> tuple[Any, dict[str, Any]]:
    """A dead letter read back from the broker (``bus.dead_letters`` and ``oxbus dlq URL``):
    its body, the payload's JSON (``None`` when the payload is not JSON), and what its fields
    say (:func:`broker_fields`)."""
    try:
        body = json.loads(row[2])
    except ValueError:
        body = None
    return body, broker_fields(row[3])


def _from_broker(row: BrokerRow, make_event: Callable[[Any], Any]) -> DeadLetter:
    """A dead letter read back from the broker, its event rebuilt by ``make_event``."""
    did, _source, payload, headers = row
    body, f = read_broker_row(row)
    # A message that cannot be rebuilt (not JSON, a class that refuses its data: often why
    # it is here) is listed as it is: its text, or its decoded body.
    try:
        event = make_event(body) if isinstance(body, dict) else (payload if body is None else body)
    except Exception:
        event = body
    event_id = body.get("event_id") if isinstance(body, dict) else None
    return DeadLetter(
        id=did, event=event, final_result=ProcessingResult(
            event_id=event_id, success=False,  # type: ignore[arg-type]
            error_message=f"{f['error_type'].rsplit('.', 1)[-1]}: {f['error_message']}",
            retry_attempt=max(0, f["attempts"] - 1), subscription=f["subscription"],
        ),
        key=body.get("key") if isinstance(body, dict) else None, headers=headers, **f,
    )


class DeadLetters:
    """The dead-letter queue of one bus: ``list()``, ``len()``, ``await retry()``, ``purge()``.

    ``durable`` maps a durable bus's subscription ids to (name, from_beginning): a dead letter
    read back from the store names its subscription only by name.
    """

    def __init__(
        self,
        core: BusCore,
        spawn: Callable[[Awaitable[Any]], None],
        durable: dict[int, tuple[str, bool]],
    ) -> None:
        self._core = core
        self._store: SqliteEventStore | None = None
        self._spawn = spawn
        self._durable = durable
        self._entries: dict[str, DeadLetter] = {}
        self._seq = 0
        #: a broker bus: where its group's dead letters are, and how to rebuild their events
        self._place: dict[str, Any] | None = None
        self._make_event: Callable[[Any], Any] = lambda body: body
        self._flush: Callable[[], Awaitable[Any] | None] = lambda: None
        self._timeout = 30.0

    def _attach(self, store: SqliteEventStore) -> None:
        """A durable bus: its dead letters are stored in ``store`` too."""
        self._store = store

    def _attach_broker(
        self,
        place: dict[str, Any],
        make_event: Callable[[Any], Any],
        flush: Callable[[], Awaitable[Any] | None],
        timeout: float = 30.0,
    ) -> None:
        """A broker bus: its dead letters are read from, retried to and removed from ``place``
        (see ``TransportCore.dead_letters``); ``flush()`` waits until those this bus wrote
        reached the broker (``None`` while it is not connected)."""
        self._place, self._make_event, self._timeout = place, make_event, timeout
        self._flush = flush

    async def _flushed(self) -> dict[str, Any]:
        """The broker's place, once the dead letters this bus wrote reached it."""
        assert self._place is not None
        pending = self._flush()
        if pending is not None:
            await pending
        return self._place

    async def refresh(self) -> int:
        """A broker bus: reads the group's dead letters from the broker (every member's, and
        those the broker dead-lettered itself), which replace the list; returns how many.
        Other buses: nothing to read, returns ``len(self)``.

        The bus reads them when it starts; call this to see what other members (or
        ``oxbus dlq``) changed since. It first waits (up to 2 s) until the dead letters this
        bus wrote reached the broker, as ``retry()`` and ``clear()`` do.
        """
        if self._place is None:
            return len(self)
        rows = await TransportCore.dead_letters(await self._flushed(), self._timeout)
        self._entries = {}
        for row in rows:
            entry = _from_broker(row, self._make_event)
            self._entries[entry.id] = entry
        self._core.set_dead_letters(len(self._entries))
        return len(self._entries)

    async def clear(self) -> int:
        """Drops every dead letter, as :meth:`purge`, and waits until they are gone from the
        broker (or the store); returns how many were removed there (on an in-memory bus, from
        the list)."""
        if self._place is None and self._store is None:
            return self.purge()
        entries = self.list()
        for e in entries:
            if e.parked_behind is None:
                self._release(e)
        self._forget(entries, remote=False)
        if self._place is not None:
            place = await self._flushed()
            return int(await TransportCore.remove_dead_letters(place, None, self._timeout))
        assert self._store is not None
        return int(await self._store._core.remove_dead_letters(None))

    def _add(self, entry: DeadLetter) -> None:
        self._entries[entry.id] = entry
        self._core.set_dead_letters(len(self._entries))

    def _forget(self, entries: builtins.list[DeadLetter], remote: bool = True) -> None:
        """Drops ``entries`` from the list and, with ``remote``, from the store or the broker
        (in the background)."""
        for e in entries:
            self._entries.pop(e.id, None)
        self._core.set_dead_letters(len(self._entries))
        if not remote:
            return
        if self._place is not None and entries:
            ids = [e.id for e in entries]
            self._spawn(TransportCore.remove_dead_letters(self._place, ids, self._timeout))
        rows = [int(e.id[3:]) for e in entries if e.id.startswith("db-")]
        if self._store is not None and rows:
            self._spawn(self._store._core.remove_dead_letters(rows))

    def _next_id(self) -> str:
        self._seq += 1
        return f"dl-{self._seq}"

    def _sub_id(self, entry: DeadLetter) -> int | None:
        """The id of the subscription a dead letter failed in, if it still exists."""
        if entry.subscription_id:
            return int(entry.subscription_id.removeprefix("sub-"))
        for sid, (name, _) in self._durable.items():
            if name == entry.subscription:
                return sid
        return None

    def list(self) -> builtins.list[DeadLetter]:
        """Every dead letter, oldest first."""
        return list(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[DeadLetter]:
        return iter(self.list())

    def _get(self, entry_or_id: DeadLetter | str) -> DeadLetter:
        key = entry_or_id.id if isinstance(entry_or_id, DeadLetter) else entry_or_id
        if key not in self._entries:
            raise KeyError(f"no dead letter with id {key!r}")
        return self._entries[key]

    def _parked_behind(self, head: DeadLetter) -> builtins.list[DeadLetter]:
        return [e for e in self._entries.values() if e.parked_behind == head.id]

    def _head_of(self, sub_id: int, key_hash: int | None) -> DeadLetter | None:
        """The dead letter a key of a subscription is parked behind, if any."""
        return next(
            (
                e
                for e in self._entries.values()
                if e.parked_behind is None and e.key_hash == key_hash
                and e.subscription_id == f"sub-{sub_id}"
            ),
            None,
        )

    def _release(self, head: DeadLetter) -> builtins.list[DeadLetter]:
        """Unparks the head's key; returns the entries parked behind it, in order."""
        sub = self._sub_id(head)
        if head.key_hash is not None and sub is not None:
            self._core.unpark(sub, head.key_hash)
        return self._parked_behind(head)

    def _redeliver(self, entries: builtins.list[DeadLetter]) -> None:
        done: builtins.list[DeadLetter] = []
        try:
            for entry in entries:
                sub = self._sub_id(entry)
                if sub is None or not self._core.redeliver(
                    entry.event, sub, entry.position, None, None, entry.key
                ):
                    raise InvalidSubscription(
                        f"dead letter {entry.id!r}: subscription {entry.subscription!r} "
                        "no longer exists; purge it or subscribe again"
                    )
                done.append(entry)
        finally:
            self._forget(done)

    def _renamed(self, entry: DeadLetter, row_id: int) -> None:
        """A dead letter got its row in the store: the row's id becomes the entry's, so a
        purge reaches the row."""
        if entry.id not in self._entries:
            return
        old = entry.id
        del self._entries[old]
        entry.id = f"db-{row_id}"
        self._entries[entry.id] = entry
        for e in self._entries.values():
            if e.parked_behind == old:
                e.parked_behind = entry.id

    async def _load(self) -> None:
        """Durable bus, at start: the stored dead letters replace the list; the head of each
        parked key parks it again, as before the restart."""
        store = self._store
        assert store is not None
        self._entries.clear()
        by_position: dict[tuple[int, str], DeadLetter] = {}
        for row in await store._core.dead_letters():
            did, pos, sub, attempts, first, last, etype, emsg, tb, key_hash, behind = row
            event = store._event_or_none(await store._core.at(pos))
            entry = DeadLetter(
                id=f"db-{did}", event=event, subscription=sub, attempts=attempts,
                first_failed_at=datetime.fromisoformat(first),
                last_failed_at=datetime.fromisoformat(last), error_type=etype,
                error_message=emsg, traceback=tb, position=pos,
                final_result=ProcessingResult(
                    event_id=event.get("event_id") if isinstance(event, dict)  # type: ignore[arg-type]
                    else getattr(event, "event_id", None),
                    success=False,
                    error_message=f"{etype.rsplit('.', 1)[-1]}: {emsg}",
                    retry_attempt=attempts - 1,
                    subscription=sub,
                ),
                key_hash=None if key_hash is None else key_hash % 2**64,
                subscription_id=next(
                    (f"sub-{sid}" for sid, (name, _) in self._durable.items() if name == sub), ""
                ),
            )
            self._add(entry)
            head = by_position.get((behind, sub)) if behind is not None else None
            if head is not None:
                entry.parked_behind = head.id
            elif entry.key_hash is not None and entry.subscription_id:
                self._core.park(int(entry.subscription_id[4:]), entry.key_hash)
            by_position[(pos, sub)] = entry

    def _as_failed_events(
        self, subscriptions: dict[int, Subscription]
    ) -> builtins.list[dict[str, Any]]:
        """``bus.get_failed_events()``: the pure-Python bus's shape."""
        return [
            {
                "event": d.event,
                "subscription": self._subscription_of(d, subscriptions),
                "final_result": d.final_result,
                "failed_at": d.last_failed_at,
            }
            for d in self.list()
        ]

    def _subscription_of(
        self, entry: DeadLetter, subscriptions: dict[int, Subscription]
    ) -> Subscription:
        """The subscription a dead letter failed in; one rebuilt from its name when it is
        gone (a dead letter read back from the store after its handler was renamed)."""
        sid = self._sub_id(entry)
        sub = None if sid is None else subscriptions.get(sid)
        if sub is not None:
            return sub
        return Subscription(
            subscription_id=entry.subscription_id, event_type=None, handler=None, priority=1,
            is_async=True, retry_count=max(0, entry.attempts - 1), name=entry.subscription,
        )

    async def retry(self, entry_or_id: DeadLetter | str | None = None) -> int:
        """Re-dispatches dead letters to their subscription only; returns how many.

        ``None`` retries all. A retried entry leaves the queue (it comes back if it fails
        again). Retrying the dead letter a key is parked behind also re-dispatches, in order,
        the events parked behind it.

        On a broker bus each goes back to the group through the broker (``None``: every dead
        letter of the group there, listed here or not), for the subscription that failed
        only: a member of the group that has it handles it. One the broker dead-lettered
        itself (or the bus refused) goes back to the whole group. It leaves the broker's
        dead-letter queue once the broker holds the retried message.
        """
        if self._place is not None:
            return await self._retry_on_broker(entry_or_id)
        chosen = self.list() if entry_or_id is None else [self._get(entry_or_id)]
        order: builtins.list[DeadLetter] = []
        for entry in chosen:
            if entry in order:
                continue
            order.append(entry)
            if entry.parked_behind is None:
                order.extend(e for e in self._release(entry) if e not in order)
        self._redeliver(order)
        return len(order)

    async def _retry_on_broker(self, entry_or_id: DeadLetter | str | None) -> int:
        assert self._place is not None
        chosen = self.list() if entry_or_id is None else [self._get(entry_or_id)]
        ids = None if entry_or_id is None else [e.id for e in chosen]
        for e in chosen:
            if e.parked_behind is None and e.subscription_id:
                self._release(e)
        n = await TransportCore.retry_dead_letters(await self._flushed(), ids, self._timeout)
        self._forget(chosen, remote=False)
        return int(n)

    def discard(self, entry_or_id: DeadLetter | str) -> int:
        """Drops one dead letter. Events parked behind it were never handled: they are
        dispatched now, in order. Returns how many entries left the queue."""
        entry = self._get(entry_or_id)
        behind = self._release(entry) if entry.parked_behind is None else []
        self._forget([entry])
        self._redeliver(behind)
        return 1 + len(behind)

    def purge(self) -> int:
        """Drops every dead letter (from the store too, on a durable bus; on a broker bus,
        those listed are removed from the broker in the background: ``await clear()`` waits),
        parked events included; returns how many."""
        entries = self.list()
        for e in entries:
            if e.parked_behind is None:
                self._release(e)
        self._forget(entries)
        return len(entries)
