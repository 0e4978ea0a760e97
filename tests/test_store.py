"""The SQLite event store (issue 3) and the durable bus on top of it.

``SqliteEventStore``: versions and optimistic concurrency (also between threads with their own
loops and between processes), reads, replay, ``StoredEvent`` fields and ``.event`` rebuilt
through the registry, JSON encoding and its refusals, upcasters, snapshots, closing, bad input.
``EventBus(store=...)``: commit before ``publish`` returns, durable subscription names,
progress kept across restarts, replay of committed but unhandled events, new subscriptions
starting from now, dead letters kept in the file.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar, Optional
from uuid import UUID, uuid4

import pydantic
import pytest

import oxbus
from oxbus import (
    ConcurrencyError,
    DomainEvent,
    EventBus,
    SerializationError,
    SqliteEventStore,
    StorageError,
    StoredEvent,
    register_event,
)
from oxbus.errors import ConfigurationError


# --- event classes ---------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Deposited(DomainEvent):
    """A plain DomainEvent subclass (its own ``__init__``)."""

    def __init__(self, account: str, amount: int) -> None:
        super().__init__()
        self.account = account
        self.amount = amount

    @property
    def aggregate_id(self) -> str:
        return self.account


@dataclass
class Line:
    sku: str
    price: Decimal
    tags: list[str] = field(default_factory=list)


@dataclass
class OrderPlaced(DomainEvent):
    """A dataclass DomainEvent with every supported kind of field."""

    order_id: UUID
    placed_at: datetime
    due: date
    total: Decimal
    color: Color
    lines: list[Line]
    extras: dict[str, Decimal]
    note: Optional[str] = None


@register_event
@dataclass(frozen=True)
class ParcelShipped:
    """A plain (frozen) dataclass, registered explicitly."""

    parcel_id: UUID
    shipped_at: datetime
    weight: Decimal
    color: Color
    stops: list[dict[str, Any]]


@register_event
class InvoiceIssued(pydantic.BaseModel):
    """A pydantic v2 model, registered explicitly."""

    invoice_id: UUID
    issued_at: datetime
    due: date
    amount: Decimal
    color: Color
    lines: list[dict[str, int]]


class Tick(DomainEvent):
    """For the durable bus."""

    def __init__(self, n: int, key: str = "k") -> None:
        super().__init__()
        self.n = n
        self.key = key

    @property
    def aggregate_id(self) -> str:
        return self.key


@dataclass
class RenamedV1:
    """An old shape of ``Renamed``: used only to write v1 rows (not registered)."""

    event_type: ClassVar[str] = "Renamed"
    event_version: ClassVar[int] = 1
    name: str


@dataclass
class RenamedV2:
    event_type: ClassVar[str] = "Renamed"
    event_version: ClassVar[int] = 2
    full_name: str


@dataclass
class Renamed(DomainEvent):
    """The current shape, at version 3."""

    event_version: ClassVar[int] = 3
    full_name: str
    language: str


@dataclass
class Unencodable:
    name: str
    items: list[Any]


class PlainUnencodable(DomainEvent):
    def __init__(self, items: list[Any]) -> None:
        super().__init__()
        self.items = items


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "events.db")


@pytest.fixture
async def store(db: str) -> Any:
    s = SqliteEventStore(db)
    yield s
    s.close()


def open_fds_on(path: str) -> list[str]:
    """Files of this process whose path starts with ``path`` (the db, -wal, -shm)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(path):
            out.append(target)
    return out


def evt(i: int, **extra: Any) -> dict[str, Any]:
    return {"event_type": "StoNumbered", "i": i, **extra}


def make_order() -> OrderPlaced:
    return OrderPlaced(
        order_id=uuid4(),
        placed_at=datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2))),
        due=date(2024, 6, 1),
        total=Decimal("19.90"),
        color=Color.BLUE,
        lines=[Line("a-1", Decimal("9.95"), ["x"]), Line("b-2", Decimal("9.95"))],
        extras={"tip": Decimal("0.10")},
        note="leave at door",
    )


# --- versions and optimistic concurrency ----------------------------------------------------


async def test_append_returns_the_new_version_and_versions_start_at_one(store: Any) -> None:
    assert await store.append("acc-1", [evt(1)], expected_version=0) == 1
    assert await store.append("acc-1", [evt(2), evt(3)], expected_version=1) == 3
    assert await store.append("acc-2", [evt(4)], expected_version=0) == 1
    assert [e.version for e in await store.read("acc-1")] == [1, 2, 3]
    assert [e.version for e in await store.read("acc-2")] == [1]


async def test_expected_version_zero_means_a_new_stream(store: Any) -> None:
    assert await store.append("fresh", [evt(1)], expected_version=0) == 1
    with pytest.raises(ConcurrencyError):
        await store.append("fresh", [evt(2)], expected_version=0)


async def test_append_without_expected_version_appends_unconditionally(store: Any) -> None:
    assert await store.append("free", [evt(1)]) == 1
    assert await store.append("free", [evt(2)]) == 2


@pytest.mark.parametrize("stale", [0, 1, 3, 7])
async def test_a_stale_expected_version_raises_concurrency_error_naming_stream_and_versions(
    store: Any, stale: int
) -> None:
    await store.append("acc-9", [evt(1), evt(2)], expected_version=0)
    with pytest.raises(ConcurrencyError) as info:
        await store.append("acc-9", [evt(3), evt(4)], expected_version=stale)
    msg = str(info.value)
    assert "acc-9" in msg
    assert f"expected version {stale}" in msg
    assert "2" in msg.replace(f"expected version {stale}", "")
    assert isinstance(info.value, oxbus.OxbusError)


async def test_a_conflicting_append_writes_nothing(store: Any) -> None:
    await store.append("acc-3", [evt(1)], expected_version=0)
    with pytest.raises(ConcurrencyError):
        await store.append("acc-3", [evt(2), evt(3)], expected_version=0)
    assert [e.data["i"] for e in await store.read_all()] == [1]
    # The stream is still at 1: the right expected version works.
    assert await store.append("acc-3", [evt(2)], expected_version=1) == 2


def _race_in_threads(path: str, stream: str, expected: int) -> list[Any]:
    """Two threads, each with its own loop and store on ``path``, append at once."""
    barrier = threading.Barrier(2)
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        async def go() -> None:
            s = SqliteEventStore(path)
            try:
                barrier.wait(timeout=30)
                try:
                    results[i] = await s.append(
                        stream, [evt(100 + i, who=i)], expected_version=expected
                    )
                except ConcurrencyError as e:
                    results[i] = e
            finally:
                s.close()

        try:
            asyncio.run(go())
        except BaseException as e:  # reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


async def test_two_threads_with_their_own_loops_and_stores_racing_one_append_exactly_one_wins(
    db: str,
) -> None:
    SqliteEventStore(db).close()  # the file exists; the race is the append's
    for round_ in range(6):
        results = await asyncio.to_thread(_race_in_threads, db, "raced", round_)
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, ConcurrencyError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert won[0] == round_ + 1
        assert f"expected version {round_}" in str(lost[0])
    async with SqliteEventStore(db) as s:
        rows = await s.read("raced")
    assert [r.version for r in rows] == [1, 2, 3, 4, 5, 6]


_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from oxbus import ConcurrencyError
    from oxbus.store import SqliteEventStore

    path, stream, expected, who = sys.argv[1:5]

    async def main():
        store = SqliteEventStore(path)
        try:
            print("ready", flush=True)
            sys.stdin.readline()  # the parent says go to both at once
            try:
                v = await store.append(
                    stream, [{"event_type": "StoRace", "who": who}], expected_version=int(expected)
                )
                print(json.dumps({"won": v}), flush=True)
            except ConcurrencyError as e:
                print(json.dumps({"conflict": str(e)}), flush=True)
        finally:
            store.close()

    asyncio.run(main())
    """
)


def test_two_processes_racing_one_append_exactly_one_wins(tmp_path: Path) -> None:
    db = str(tmp_path / "procs.db")
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    SqliteEventStore(db).close()
    for round_ in range(4):
        procs = [
            subprocess.Popen(
                [sys.executable, str(script), db, "raced", str(round_), f"p{i}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        try:
            for p in procs:
                assert p.stdout is not None
                assert p.stdout.readline().strip() == "ready"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, err
        results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
        won = [r["won"] for r in results if "won" in r]
        lost = [r["conflict"] for r in results if "conflict" in r]
        assert won == [round_ + 1] and len(lost) == 1, results
        assert "raced" in lost[0] and f"expected version {round_}" in lost[0]

    async def check() -> list[Any]:
        async with SqliteEventStore(db) as s:
            return await s.read("raced")

    rows = asyncio.run(check())
    assert [r.version for r in rows] == [1, 2, 3, 4]


def test_threads_opening_a_new_file_at_the_same_moment_all_succeed(tmp_path: Path) -> None:
    # Processes of one application starting together all open (and create) the log. A
    # failure shows up in a few percent of rounds: try up to 300 rounds, stop at the first.
    failures: list[str] = []
    for round_ in range(300):
        path = str(tmp_path / f"fresh-{round_}.db")
        barrier = threading.Barrier(6)

        def open_and_close() -> None:
            barrier.wait(timeout=30)
            try:
                SqliteEventStore(path).close()
            except Exception as e:
                failures.append(f"round {round_}: {e!r}")

        threads = [threading.Thread(target=open_and_close) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if failures:
            break
    assert failures == []


# --- reading ---------------------------------------------------------------------------------


async def test_read_returns_one_stream_after_a_version_in_order(store: Any) -> None:
    await store.append("a", [evt(1), evt(2)], expected_version=0)
    await store.append("b", [evt(3)], expected_version=0)
    await store.append("a", [evt(4)], expected_version=2)
    assert [(e.version, e.data["i"]) for e in await store.read("a")] == [(1, 1), (2, 2), (3, 4)]
    assert [e.version for e in await store.read("a", after_version=1)] == [2, 3]
    assert [e.version for e in await store.read("a", 2)] == [3]
    assert await store.read("a", after_version=3) == []
    assert await store.read("nobody") == []
    assert all(e.stream_id == "a" for e in await store.read("a"))


async def test_read_all_is_in_commit_order_after_a_position_and_at_most_limit(store: Any) -> None:
    for i in range(1, 11):
        await store.append(f"s{i % 3}", [evt(i)])
    everything = await store.read_all()
    assert [e.position for e in everything] == list(range(1, 11))
    assert [e.data["i"] for e in everything] == list(range(1, 11))
    page = await store.read_all(after_position=3, limit=4)
    assert [e.position for e in page] == [4, 5, 6, 7]
    assert [e.position for e in await store.read_all(7, 100)] == [8, 9, 10]
    assert await store.read_all(after_position=10) == []
    assert [e.position for e in await store.read_all(0, 1)] == [1]


async def test_read_all_default_limit_is_1000(store: Any) -> None:
    await store.append("big", [evt(i) for i in range(1200)])
    assert len(await store.read_all()) == 1000


async def test_replay_yields_the_whole_log_in_order_across_batch_boundaries(store: Any) -> None:
    for chunk in range(5):
        await store.append(f"r{chunk % 2}", [evt(chunk * 5 + j) for j in range(5)])  # 25 events
    for batch in (1, 7, 10, 25, 100):
        got = [e.position async for e in store.replay(batch_size=batch)]
        assert got == list(range(1, 26)), batch
    assert [e.position async for e in store.replay(after_position=20, batch_size=2)] == [
        21,
        22,
        23,
        24,
        25,
    ]


async def test_async_for_over_the_store_reads_past_the_default_batch(store: Any) -> None:
    n = 2345
    for start in range(0, n, 500):
        await store.append("many", [evt(i) for i in range(start, min(n, start + 500))])
    seen = [e async for e in store]
    assert [e.position for e in seen] == list(range(1, n + 1))
    assert [e.data["i"] for e in seen] == list(range(n))
    assert [e.version for e in seen] == list(range(1, n + 1))


# --- StoredEvent -----------------------------------------------------------------------------


async def test_stored_event_carries_every_field(store: Any) -> None:
    before = datetime.now(timezone.utc) - timedelta(milliseconds=1)
    e = Deposited("acc-7", 250)
    await store.append("acc-7", [evt(0)], expected_version=0)
    await store.append("acc-7", [e], expected_version=1)
    after = datetime.now(timezone.utc) + timedelta(milliseconds=1)
    (s,) = await store.read("acc-7", after_version=1)
    assert isinstance(s, StoredEvent)
    assert s.position == 2
    assert s.stream_id == "acc-7"
    assert s.version == 2
    assert s.event_type == "Deposited"
    assert s.event_version == 1
    assert s.data == {"account": "acc-7", "amount": 250}
    assert s.event_id == e.event_id
    assert s.metadata["correlation_id"] == e.event_id  # a root event correlates with itself
    assert s.metadata.get("causation_id") is None
    assert s.occurred_at == e.occurred_at
    assert s.occurred_at is not None and s.occurred_at.utcoffset() is not None
    assert s.recorded_at.utcoffset() is not None
    assert before <= s.recorded_at <= after


async def test_metadata_keeps_explicit_correlation_and_causation_ids(store: Any) -> None:
    e = Deposited("acc-8", 1)
    e.correlation_id = "corr-1"
    e.causation_id = "cause-1"
    await store.append("acc-8", [e])
    (s,) = await store.read("acc-8")
    assert s.metadata["correlation_id"] == "corr-1"
    assert s.metadata["causation_id"] == "cause-1"
    rebuilt = s.event
    assert rebuilt.correlation_id == "corr-1"
    assert rebuilt.causation_id == "cause-1"


async def test_events_appended_from_a_handler_carry_its_correlation_and_causation(
    store: Any,
) -> None:
    bus = EventBus()
    origin = Deposited("acc-h", 5)

    async def handler(event: Deposited) -> None:
        await store.append("follow-ups", [Tick(1)])

    bus.subscribe(Deposited, handler)
    async with bus:
        await bus.publish(origin)
        await bus.drain()
    (s,) = await store.read("follow-ups")
    assert s.metadata["correlation_id"] == origin.correlation_id == origin.event_id
    assert s.metadata["causation_id"] == origin.event_id
    assert s.event.causation_id == origin.event_id


async def test_plain_domain_event_comes_back_as_its_class(store: Any) -> None:
    e = Deposited("acc-1", 42)
    await store.append("acc-1", [e])
    (s,) = await store.read("acc-1")
    back = s.event
    assert type(back) is Deposited
    assert (back.account, back.amount) == ("acc-1", 42)
    assert back.aggregate_id == "acc-1"
    assert back.event_id == e.event_id
    assert back.occurred_at == e.occurred_at


async def test_dataclass_domain_event_with_every_supported_type_round_trips(store: Any) -> None:
    e = make_order()
    await store.append("order-1", [e])
    (s,) = await store.read("order-1")
    back = s.event
    assert type(back) is OrderPlaced
    assert back == e
    assert isinstance(back.lines[0], Line) and isinstance(back.lines[0].price, Decimal)
    assert back.placed_at.utcoffset() == timedelta(hours=2)
    assert back.event_id == e.event_id


async def test_registered_plain_dataclass_round_trips(store: Any) -> None:
    e = ParcelShipped(
        parcel_id=uuid4(),
        shipped_at=datetime(2024, 5, 2, 8, 0, tzinfo=timezone.utc),
        weight=Decimal("1.250"),
        color=Color.RED,
        stops=[{"city": "Lyon", "n": [1, 2, {"deep": True}]}],
    )
    await store.append("parcel-1", [e])
    (s,) = await store.read("parcel-1")
    assert s.event_type == "ParcelShipped"
    assert s.event == e
    assert type(s.event) is ParcelShipped


async def test_registered_pydantic_model_round_trips(store: Any) -> None:
    e = InvoiceIssued(
        invoice_id=uuid4(),
        issued_at=datetime(2024, 5, 3, 9, 15, tzinfo=timezone.utc),
        due=date(2024, 6, 3),
        amount=Decimal("100.01"),
        color=Color.BLUE,
        lines=[{"qty": 2}, {"qty": 3}],
    )
    await store.append("inv-1", [e])
    (s,) = await store.read("inv-1")
    assert s.event_type == "InvoiceIssued"
    assert type(s.event) is InvoiceIssued
    assert s.event == e


async def test_dict_events_store_json_values_and_come_back_as_their_dict(store: Any) -> None:
    uid = uuid4()
    when = datetime(2024, 5, 1, 12, 0, 0, 500, tzinfo=timezone.utc)
    e = {
        "event_type": "sto.unregistered.thing",
        "when": when,
        "day": date(2024, 5, 1),
        "id": uid,
        "amount": Decimal("10.50"),
        "color": Color.RED,
        "nested": {"list": [1, 2.5, None, True, {"at": when}], "tuple": (1, "two")},
    }
    await store.append("dicts", [e])
    (s,) = await store.read("dicts")
    expected = {
        "when": when.isoformat(),
        "day": "2024-05-01",
        "id": str(uid),
        "amount": "10.50",
        "color": "red",
        "nested": {"list": [1, 2.5, None, True, {"at": when.isoformat()}], "tuple": [1, "two"]},
    }
    assert s.event_type == "sto.unregistered.thing"
    # The dict as published; whether its "event_type" item is kept in the data is open.
    data = dict(s.data)
    assert data.pop("event_type", "sto.unregistered.thing") == "sto.unregistered.thing"
    assert data == expected
    assert s.event == s.data  # an unknown type comes back as its dict, not an error
    assert isinstance(s.event, dict)


async def test_stored_data_is_json_not_pickle(store: Any, db: str) -> None:
    await store.append("j", [make_order(), Deposited("j", 1), {"event_type": "x", "v": 1}])
    assert all(isinstance(e.data, dict) for e in await store.read_all())
    assert all(isinstance(e.metadata, dict) for e in await store.read_all())
    with sqlite3.connect(db) as raw:
        rows = raw.execute("SELECT data, metadata FROM events ORDER BY position").fetchall()
    raw.close()
    assert len(rows) == 3
    for data, metadata in rows:
        assert isinstance(data, str) and isinstance(json.loads(data), dict)
        assert isinstance(metadata, str) and isinstance(json.loads(metadata), dict)


# --- encoding failures -----------------------------------------------------------------------


async def test_unencodable_dataclass_event_raises_serialization_error_naming_path_and_type(
    store: Any,
) -> None:
    with pytest.raises(SerializationError) as info:
        await store.append("bad", [Unencodable("n", [1, {"x": 1j}])])
    msg = str(info.value)
    assert 'Unencodable.items[1]["x"]' in msg
    assert "complex" in msg


async def test_unencodable_plain_domain_event_names_the_attribute_path(store: Any) -> None:
    with pytest.raises(SerializationError) as info:
        await store.append("bad", [PlainUnencodable([1, 2, object()])])
    msg = str(info.value)
    assert "PlainUnencodable.items[2]" in msg, msg
    assert "'object'" in msg


async def test_unencodable_dict_event_names_the_key_path(store: Any) -> None:
    with pytest.raises(SerializationError) as info:
        await store.append("bad", [{"event_type": "x", "payload": {"when": {1, 2, b"raw"}}}])
    msg = str(info.value)
    assert '["payload"]["when"]' in msg
    assert "bytes" in msg


async def test_an_unencodable_event_in_a_batch_writes_nothing(store: Any) -> None:
    with pytest.raises(SerializationError):
        await store.append("mixed", [evt(1), Unencodable("n", [1j]), evt(3)], expected_version=0)
    assert await store.read_all() == []
    assert await store.read("mixed") == []
    assert await store.append("mixed", [evt(1)], expected_version=0) == 1


# --- upcasters -------------------------------------------------------------------------------


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    return {"full_name": data["name"].title()}


def _v2_to_v3(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "language": "en"}


async def test_upcasters_chain_v1_to_v3_on_read(store: Any) -> None:
    await store.append("person-1", [RenamedV1("ada lovelace")])
    await store.append("person-1", [RenamedV2("Grace Hopper")])
    await store.append("person-1", [Renamed("Alan Turing", "fr")])
    raw = await store.read("person-1")
    assert [(e.event_type, e.event_version) for e in raw] == [
        ("Renamed", 1),
        ("Renamed", 2),
        ("Renamed", 3),
    ]
    store.register_upcaster("Renamed", 1, _v1_to_v2)
    store.register_upcaster("Renamed", 2, _v2_to_v3)
    v1, v2, v3 = await store.read("person-1")
    assert (v1.event_version, v1.data) == (3, {"full_name": "Ada Lovelace", "language": "en"})
    assert (v2.event_version, v2.data) == (3, {"full_name": "Grace Hopper", "language": "en"})
    assert (v3.event_version, v3.data) == (3, {"full_name": "Alan Turing", "language": "fr"})
    assert v1.event == Renamed("Ada Lovelace", "en")
    assert type(v1.event) is Renamed
    # read_all and replay upcast too
    assert [e.data["full_name"] for e in await store.read_all()] == [
        "Ada Lovelace",
        "Grace Hopper",
        "Alan Turing",
    ]
    assert [e.event_version async for e in store] == [3, 3, 3]


async def test_registering_an_upcaster_twice_raises(store: Any) -> None:
    store.register_upcaster("Renamed", 1, _v1_to_v2)
    with pytest.raises(ConfigurationError) as info:
        store.register_upcaster("Renamed", 1, _v2_to_v3)
    assert "Renamed" in str(info.value)


# --- snapshots -------------------------------------------------------------------------------


async def test_load_snapshot_is_none_when_absent(store: Any) -> None:
    assert await store.load_snapshot("nothing-here") is None


async def test_save_snapshot_replaces_and_load_snapshot_loads(store: Any, db: str) -> None:
    await store.save_snapshot("acc-1", 3, {"balance": Decimal("10.50"), "owner": "ada"})
    snap = await store.load_snapshot("acc-1")
    assert snap is not None
    assert (snap.stream_id, snap.version) == ("acc-1", 3)
    assert snap.state == {"balance": "10.50", "owner": "ada"}
    assert snap.taken_at.utcoffset() is not None
    await store.save_snapshot("acc-1", 7, {"balance": "99", "owner": "ada"})
    snap = await store.load_snapshot("acc-1")
    assert snap is not None and (snap.version, snap.state["balance"]) == (7, "99")
    assert await store.load_snapshot("acc-2") is None
    store.close()
    async with SqliteEventStore(db) as again:
        snap = await again.load_snapshot("acc-1")
    assert snap is not None and snap.version == 7


# --- closing ---------------------------------------------------------------------------------


async def test_close_releases_the_file_so_it_can_be_deleted_at_once(db: str) -> None:
    s = SqliteEventStore(db)
    await s.append("a", [evt(1)])
    await s.read_all()
    assert open_fds_on(db)  # it is open while in use
    s.close()
    assert open_fds_on(db) == []
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.remove(db + suffix)
    assert not any(os.path.exists(db + suffix) for suffix in ("", "-wal", "-shm"))


async def test_use_after_close_raises_storage_error(db: str) -> None:
    s = SqliteEventStore(db)
    await s.append("a", [evt(1)])
    s.close()
    assert s.closed
    with pytest.raises(StorageError):
        await s.append("a", [evt(2)])
    with pytest.raises(StorageError):
        await s.read("a")
    with pytest.raises(StorageError):
        await s.read_all()
    with pytest.raises(StorageError):
        await s.load_snapshot("a")
    with pytest.raises(StorageError):
        await s.save_snapshot("a", 1, {})
    with pytest.raises(StorageError):
        [e async for e in s]


async def test_close_is_idempotent(db: str) -> None:
    s = SqliteEventStore(db)
    s.close()
    s.close()
    assert s.closed


async def test_with_closes_the_store(db: str) -> None:
    with SqliteEventStore(db) as s:
        await s.append("a", [evt(1)])
    assert s.closed
    assert open_fds_on(db) == []
    with pytest.raises(StorageError):
        await s.read_all()


async def test_async_with_closes_the_store(db: str) -> None:
    async with SqliteEventStore(db) as s:
        await s.append("a", [evt(1)])
    assert s.closed
    assert open_fds_on(db) == []
    with pytest.raises(StorageError):
        await s.read_all()
    # and the data is there for the next opener
    async with SqliteEventStore(db) as again:
        assert [e.data["i"] for e in await again.read_all()] == [1]


async def test_memory_store_works_and_is_private() -> None:
    async with SqliteEventStore(":memory:") as a, SqliteEventStore(":memory:") as b:
        assert await a.append("m", [evt(1), evt(2)], expected_version=0) == 2
        assert [e.version for e in await a.read("m")] == [1, 2]
        assert await b.read_all() == []
        await a.save_snapshot("m", 2, {"n": 2})
        snap = await a.load_snapshot("m")
        assert snap is not None and snap.state == {"n": 2}


# --- bad input -------------------------------------------------------------------------------


async def test_empty_stream_id_is_refused_naming_it(store: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        await store.append("", [evt(1)])
    assert "stream_id" in str(info.value) and "''" in str(info.value)
    assert await store.read_all() == []


async def test_empty_event_list_is_refused(store: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        await store.append("s", [])
    assert "event" in str(info.value)
    assert await store.read_all() == []


async def test_negative_expected_version_is_refused_naming_it(store: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        await store.append("s", [evt(1)], expected_version=-1)
    assert "expected_version" in str(info.value) and "-1" in str(info.value)
    assert await store.read_all() == []


async def test_zero_limit_is_refused_naming_it(store: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        await store.read_all(limit=0)
    assert "limit" in str(info.value) and "0" in str(info.value)


def test_unknown_synchronous_setting_is_refused_naming_it(db: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        SqliteEventStore(db, synchronous="sometimes")
    assert "synchronous" in str(info.value) and "sometimes" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_both_synchronous_settings_work_in_wal_mode(db: str, synchronous: str) -> None:
    async with SqliteEventStore(db, synchronous=synchronous) as s:
        assert await s.append("s", [evt(1), evt(2)], expected_version=0) == 2
        assert [e.data["i"] for e in await s.read("s")] == [1, 2]
    with sqlite3.connect(db) as raw:
        mode = raw.execute("PRAGMA journal_mode").fetchone()[0]
        n = raw.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    raw.close()
    assert (mode, n) == ("wal", 2)


# --- the durable bus -------------------------------------------------------------------------


async def test_durable_publish_returns_after_the_event_is_in_the_log(db: str) -> None:
    gate = asyncio.Event()
    handled: list[int] = []

    async def slow(event: Tick) -> None:
        await gate.wait()
        handled.append(event.n)

    store = SqliteEventStore(db)
    reader = SqliteEventStore(db)  # another connection: the event must be committed
    bus = EventBus(store=store)
    bus.subscribe(Tick, slow, name="slow")
    try:
        await bus.start()
        e = Tick(1)
        assert await bus.publish(e) is True
        rows = await reader.read_all()
        assert [r.event_id for r in rows] == [e.event_id]
        assert rows[0].event_type == "Tick"
        assert handled == []  # not yet handled: the log comes first
        gate.set()
        await bus.drain(timeout=10)
        assert handled == [1]
    finally:
        gate.set()
        await bus.stop(timeout=10)
        store.close()
        reader.close()


async def test_durable_bus_given_a_path_commits_to_that_file(db: str) -> None:
    bus = EventBus(store=db)

    async def h(event: Tick) -> None:
        pass

    bus.subscribe(Tick, h, name="h")
    async with bus:
        await bus.publish(Tick(7))
        async with SqliteEventStore(db) as reader:
            rows = await reader.read_all()
        assert [r.event.n for r in rows] == [7]
    assert open_fds_on(db) == []  # the bus closed the store it opened


async def test_duplicate_subscription_name_on_a_durable_bus_raises_value_error_at_once(
    store: Any,
) -> None:
    bus = EventBus(store=store)

    async def h(event: Tick) -> None:
        pass

    async def other(event: Tick) -> None:
        pass

    bus.subscribe(Tick, h, name="billing")
    with pytest.raises(ValueError) as info:
        bus.subscribe(Tick, other, name="billing")
    assert "billing" in str(info.value)
    bus.subscribe(Tick, h)  # default name: the qualified name
    with pytest.raises(ValueError):
        bus.subscribe("Tick", h)
    # in memory, duplicates are fine
    mem = EventBus()
    mem.subscribe(Tick, h, name="billing")
    mem.subscribe(Tick, other, name="billing")


def _recording(seen: list[int]) -> Any:
    async def record(event: Tick) -> None:
        seen.append(event.n)

    return record


async def test_after_restart_nothing_already_handled_is_delivered_again(db: str) -> None:
    first: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(first), name="ledger")
    async with bus:
        for n in range(5):
            await bus.publish(Tick(n, key=f"k{n % 2}"))
        await bus.drain(timeout=10)
    assert sorted(first) == [0, 1, 2, 3, 4]

    for _ in range(2):
        again: list[int] = []
        bus = EventBus(store=db)
        bus.subscribe(Tick, _recording(again), name="ledger")
        async with bus:
            await bus.drain(timeout=10)
            assert again == []
    # and it still delivers new events
    later: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(later), name="ledger")
    async with bus:
        await bus.publish(Tick(99))
        await bus.drain(timeout=10)
    assert later == [99]


async def test_events_committed_but_not_handled_before_stop_without_drain_come_after_restart(
    db: str,
) -> None:
    fast_first: list[int] = []
    first: list[int] = []
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def stuck_from_3(event: Tick) -> None:
        first.append(event.n)
        if event.n >= 3:
            entered.set()
            await gate.wait()

    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(fast_first), name="fast", priority=1)
    bus.subscribe(Tick, stuck_from_3, name="worker", priority=5)
    await bus.start()
    for n in range(3):
        await bus.publish(Tick(n))
    await bus.drain(timeout=10)
    for n in range(3, 6):
        await bus.publish(Tick(n))
    await asyncio.wait_for(entered.wait(), 10)  # "worker" is inside event 3, "fast" is past it
    await bus.stop(drain=False)
    assert first == [0, 1, 2, 3]
    assert fast_first == [0, 1, 2, 3]

    fast: list[int] = []
    second: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(fast), name="fast", priority=1)
    bus.subscribe(Tick, _recording(second), name="worker", priority=5)
    await bus.start()
    try:
        await bus.drain(timeout=10)  # waits for the replay
        assert second == [3, 4, 5]  # 3 was never finished; per-key order
        assert fast == [4, 5]  # progress is per subscription
    finally:
        await bus.stop(timeout=10)


async def test_durable_log_metadata_keeps_correlation_and_causation(db: str) -> None:
    store = SqliteEventStore(db)
    bus = EventBus(store=store)
    parent = Tick(1)

    async def fan_out(event: Tick) -> None:
        if event.n == 1:
            await bus.publish(Tick(2))

    bus.subscribe(Tick, fan_out, name="fan_out")
    try:
        async with bus:
            await bus.publish(parent, correlation_id="corr-42")
            await bus.drain(timeout=10)
        one, two = await store.read_all()
        assert one.event_id == parent.event_id
        assert one.metadata["correlation_id"] == "corr-42"
        assert two.metadata["correlation_id"] == "corr-42"
        assert two.metadata["causation_id"] == parent.event_id
        assert two.event.causation_id == parent.event_id
    finally:
        store.close()


async def test_a_subscription_added_on_a_restarted_bus_starts_from_now_unless_from_beginning(
    db: str,
) -> None:
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording([]), name="old")
    async with bus:
        await bus.publish(Tick(1))
        await bus.publish(Tick(2))
        await bus.drain(timeout=10)

    old: list[int] = []
    new: list[int] = []
    everything: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(old), name="old")
    bus.subscribe(Tick, _recording(new), name="new")
    bus.subscribe(Tick, _recording(everything), name="replayer", from_beginning=True)
    async with bus:
        await bus.drain(timeout=10)
        assert (old, new, everything) == ([], [], [1, 2])
        await bus.publish(Tick(3))
        await bus.drain(timeout=10)
    assert (old, new, everything) == ([3], [3], [1, 2, 3])

    # Once registered, "new" keeps its place: it does not skip what it missed while stopped.
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording([]), name="old")
    async with bus:
        await bus.publish(Tick(4))
        await bus.drain(timeout=10)
    missed: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(missed), name="new")
    async with bus:
        await bus.drain(timeout=10)
    assert missed == [4]


async def test_a_dead_letter_survives_restart_with_its_event_rebuilt(db: str) -> None:
    calls: list[int] = []

    async def broken(event: Tick) -> None:
        calls.append(event.n)
        raise ValueError(f"boom {event.n}")

    original = Tick(1, key="acct")
    bus = EventBus(store=db)
    bus.subscribe(Tick, broken, name="broken")
    bus.subscribe(Tick, _recording([]), name="fine")
    async with bus:
        await bus.publish(original)
        await bus.drain(timeout=10)
        assert len(bus.dead_letters) == 1
    assert calls == [1]

    calls.clear()
    bus = EventBus(store=db)
    bus.subscribe(Tick, broken, name="broken")
    bus.subscribe(Tick, _recording([]), name="fine")
    async with bus:
        await bus.drain(timeout=10)
        assert calls == []  # a dead-lettered event is done: not delivered again
        (dl,) = bus.dead_letters.list()
        assert dl.subscription == "broken"
        assert type(dl.event) is Tick
        assert (dl.event.n, dl.event.key, dl.event.event_id) == (1, "acct", original.event_id)
        assert dl.error_type == "ValueError"
        assert dl.error_message == "boom 1"
        assert dl.attempts == 1
        assert "boom 1" in dl.traceback
        assert dl.first_failed_at.utcoffset() == timedelta(0)
        assert dl.last_failed_at.utcoffset() == timedelta(0)
        assert dl.first_failed_at <= dl.last_failed_at
        assert bus.get_failed_events()[0]["event"].event_id == original.event_id


async def test_concurrent_durable_publishes_are_all_in_the_log_when_they_return(db: str) -> None:
    seen: list[int] = []
    store = SqliteEventStore(db)
    bus = EventBus(store=store, workers=4)
    bus.subscribe(Tick, _recording(seen), name="many")
    try:
        await bus.start()
        events = [Tick(n, key=f"k{n % 5}") for n in range(300)]
        assert await asyncio.gather(*(bus.publish(e) for e in events)) == [True] * 300
        async with SqliteEventStore(db) as reader:
            rows = [r async for r in reader]
        assert sorted(r.event_id for r in rows) == sorted(e.event_id for e in events)
        assert len({r.position for r in rows}) == 300
        assert await bus.publish_many([Tick(n) for n in range(300, 310)]) == 10
        assert len(await store.read_all(after_position=rows[-1].position)) == 10
        await bus.drain(timeout=10)
        assert sorted(seen) == list(range(310))
    finally:
        await bus.stop(timeout=10)
        store.close()


async def test_purged_dead_letters_stay_purged_after_restart(db: str) -> None:
    async def broken(event: Tick) -> None:
        raise RuntimeError("nope")

    bus = EventBus(store=db)
    bus.subscribe(Tick, broken, name="broken")
    async with bus:
        await bus.publish(Tick(1))
        await bus.publish(Tick(2))
        await bus.drain(timeout=10)
    bus = EventBus(store=db)
    bus.subscribe(Tick, broken, name="broken")
    async with bus:
        assert sorted(d.event.n for d in bus.dead_letters.list()) == [1, 2]
        assert bus.dead_letters.purge() == 2
    bus = EventBus(store=db)
    bus.subscribe(Tick, broken, name="broken")
    async with bus:
        await bus.drain(timeout=10)
        assert bus.dead_letters.list() == []


async def test_a_restarted_bus_replays_to_each_subscription_only_the_events_it_matches(
    db: str,
) -> None:
    ticks: list[int] = []
    deposits: list[int] = []

    async def on_tick(event: Tick) -> None:
        ticks.append(event.n)

    async def on_deposit(event: Deposited) -> None:
        deposits.append(event.amount)

    bus = EventBus(store=db)
    bus.subscribe(Tick, on_tick, name="ticks")
    bus.subscribe(Deposited, on_deposit, name="deposits")
    async with bus:
        await bus.publish(Tick(1))
        await bus.publish(Deposited("a-1", 5))
        await bus.drain(timeout=10)
    assert (ticks, deposits) == ([1], [5])
    # "ticks" never finished the deposit (it does not match it), nor "deposits" the tick:
    # a restart must not hand them over.
    bus = EventBus(store=db)
    bus.subscribe(Tick, on_tick, name="ticks")
    bus.subscribe(Deposited, on_deposit, name="deposits")
    async with bus:
        await bus.drain(timeout=10)
    assert (ticks, deposits) == ([1], [5])


async def test_two_durable_buses_on_one_file_log_the_same_keys_with_contiguous_versions(
    db: str,
) -> None:
    # Each writer caches its `$bus:<key>` stream versions; the other's appends must be seen,
    # not raised as conflicts, and no version may be skipped or taken twice.
    buses = [EventBus(store=SqliteEventStore(db)) for _ in range(2)]
    seen: list[int] = []
    for i, bus in enumerate(buses):
        bus.subscribe(Tick, _recording(seen), name=f"ledger-{i}")
    async with buses[0], buses[1]:
        for n in range(40):
            await buses[n % 2].publish(Tick(n, key=f"k{n % 3}"))
            if n % 7 == 0:
                await buses[(n + 1) % 2].publish_many([Tick(1000 + n, key="k0")])
        for bus in buses:
            await bus.drain(timeout=10)
    for bus in buses:
        assert bus._store is not None
        bus._store.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT stream_id, version FROM events ORDER BY stream_id, version"
        ).fetchall()
    conn.close()  # the with block commits, it does not close (ResourceWarning on 3.13)
    by_stream: dict[str, list[int]] = {}
    for stream, version in rows:
        by_stream.setdefault(stream, []).append(version)
    assert set(by_stream) == {"$bus:k0", "$bus:k1", "$bus:k2"}
    for stream, versions in by_stream.items():
        assert versions == list(range(1, len(versions) + 1)), stream
    assert len(rows) == 40 + 6 == len(seen)


async def test_progress_recorded_by_workers_is_committed_when_the_bus_stops(db: str) -> None:
    # Finished deliveries are committed with later writes or after a short linger; stopping
    # the bus (which closes the store it opened) must commit the last ones too.
    first: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(first), name="ledger")
    async with bus:
        await bus.publish_many([Tick(n, key=f"k{n % 4}") for n in range(200)])
        await bus.drain(timeout=10)
    assert sorted(first) == list(range(200))
    with sqlite3.connect(db) as conn:
        done = conn.execute("SELECT COUNT(*) FROM progress WHERE subscription = 'ledger'").fetchone()
    conn.close()  # the with block commits, it does not close (ResourceWarning on 3.13)
    assert done == (200,)
    again: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(again), name="ledger")
    async with bus:
        await bus.drain(timeout=10)
    assert again == []


# --- large publish_many groups and DomainEvent identity read in Rust ------------------------


async def test_a_large_publish_many_is_one_ordered_group_and_an_unencodable_event_writes_nothing(
    db: str,
) -> None:
    # Groups above 128 events reach the writer in parts while they are encoded: the first
    # parts are inserted before the bad event is met, and must still vanish.
    seen: list[int] = []
    bus = EventBus(store=db)
    bus.subscribe(Tick, _recording(seen), name="ledger")
    async with bus:
        bad = [Tick(n, key=f"k{n % 5}") for n in range(1000)]
        bad[900] = PlainUnencodable([1j])  # type: ignore[call-overload]
        with pytest.raises(SerializationError, match="items"):
            await bus.publish_many(bad)
        assert bus._store is not None
        assert await bus._store.read_all() == []
        # Other requests made while a group is open wait for it and are not lost.
        good = [Tick(n, key=f"k{n % 5}") for n in range(1000)]
        many = asyncio.ensure_future(bus.publish_many(good))
        await asyncio.gather(*(bus.publish(Tick(5000 + i, key="other")) for i in range(20)))
        assert await many == 1000
        await bus.drain(timeout=10)
        rows = await bus._store.read_all(limit=5000)
    assert sorted(seen) == list(range(1000)) + list(range(5000, 5020))
    group = [r for r in rows if r.stream_id != "$bus:other"]
    assert [r.event.n for r in group] == list(range(1000))
    positions = [r.position for r in group]
    assert positions == list(range(positions[0], positions[0] + 1000)), "one contiguous group"


class Typed(DomainEvent):
    event_type = "sto.typed"  # a class attribute overriding the lazy default

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


class OwnIds(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__(event_id=f"own-{n}", correlation_id="corr-x")
        self.n = n

    @property
    def causation_id(self) -> str:  # type: ignore[override]
        return "cause-y"


async def test_a_logged_creation_time_is_the_one_the_event_shows_to_the_microsecond(
    store: Any,
) -> None:
    # The log writes a fresh DomainEvent's occurred_at from its creation timestamp in Rust;
    # the event makes its datetime from the same timestamp in Python when read afterwards.
    # Rounding edges (halves of a microsecond, whole seconds, a carry into the next second)
    # and random times must come out the same.
    rng = random.Random(7)
    stamps = [0.0000005, 0.0000015, 1.5, 1.9999999, 1_700_000_000.0, 1_733_400_000.1234565]
    stamps += [rng.uniform(0, 4_000_000_000) for _ in range(300)]
    events = []
    for ts in stamps:
        e = Tick(0)
        e.__dict__["_oxbus_ts"] = ts
        events.append(e)
    await store.append("times", events)
    rows = await store.read("times")
    raw = [r[8] for r in await store._core.read("times", 0)]
    for row, text, event, ts in zip(rows, raw, events, stamps):
        assert row.occurred_at == event.occurred_at, ts
        assert text == event.occurred_at.isoformat(), ts


async def test_logged_identity_is_what_the_event_shows_before_and_after_publishing(
    store: Any,
) -> None:
    fresh = Tick(1)
    read_first = Tick(2)
    read_first.event_id, read_first.occurred_at  # computed by Python first
    typed, own = Typed(3), OwnIds(4)
    await store.append("ids", [fresh, read_first, typed, own])
    rows = await store.read("ids")
    for row, event in zip(rows, [fresh, read_first, typed, own]):
        assert row.event_id == event.event_id
        assert row.occurred_at == event.occurred_at
        assert row.correlation_id == event.correlation_id
        assert row.causation_id == event.causation_id
        assert row.event_type == event.event_type
    assert fresh.occurred_at.tzinfo is timezone.utc
    assert [r.event_type for r in rows] == ["Tick", "Tick", "sto.typed", "OwnIds"]
    assert (rows[3].event_id, rows[3].correlation_id, rows[3].causation_id) == (
        "own-4", "corr-x", "cause-y",
    )
    assert rows[0].correlation_id == rows[0].event_id  # a root event's default


def test_a_store_dropped_without_close_right_after_a_reply_does_not_deadlock(tmp_path: Path) -> None:
    # The writer thread may still hold on to its last hand-off (waiting for the GIL) when the
    # loop, woken by it, drops the last reference to the store: dropping must not wait for it.
    script = textwrap.dedent(
        f"""
        import asyncio, gc
        from oxbus import SqliteEventStore

        async def main():
            for i in range(300):
                store = SqliteEventStore({str(tmp_path / "drop.db")!r})
                await store.append(f"s{{i}}", [{{"event_type": "StoDropped", "i": i}}])
                del store
                gc.collect()
            print("done")

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "done"
