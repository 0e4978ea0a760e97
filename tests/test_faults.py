"""Faults and bad input (issue 4): each case ends in a clear typed error (``oxbus.errors``) or a
stated recovery, and loses nothing it accepted.

Handlers that raise, hang, return something that is not awaitable, or raise ``BaseException``
subclasses; bad events (None, unhashable keys, over ``max_event_bytes``, not encodable);
misuse of the lifecycle; the SQLite file deleted, read-only, locked, corrupt, on a full disk;
the asyncio loop closed under the store. Cases that can kill or wedge a process run in a
subprocess.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _env import unavailable
from oxbus import (
    BusClosed,
    BusNotStarted,
    DomainEvent,
    EventBus,
    SerializationError,
    SqliteEventStore,
    StorageError,
)
from oxbus.errors import InvalidEvent, InvalidSubscription, OxbusError

PY = sys.executable


class Event(DomainEvent):
    def __init__(self, n: int, key: Any = None, payload: Any = "") -> None:
        super().__init__()
        self.n = n
        self.key = key
        self.payload = payload

    @property
    def aggregate_id(self) -> Any:
        return self.key


class Fatal(BaseException):
    """A BaseException that is neither KeyboardInterrupt, SystemExit nor CancelledError."""


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")


def run_script(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def no_crash(p: subprocess.CompletedProcess[str]) -> None:
    for bad in ("Fatal Python error", "panicked", "Segmentation fault", "core dumped"):
        assert bad not in p.stderr, p.stderr[-3000:]


# =============================================================================================
# Handlers
# =============================================================================================


async def test_a_raising_handler_is_logged_and_dead_lettered_and_the_rest_is_handled(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="oxbus")
    bus = await make_bus(workers=2)
    handled: list[int] = []

    async def handle(event: Event) -> None:
        if event.n % 10 == 0:
            raise RuntimeError(f"bad {event.n}")
        handled.append(event.n)

    bus.subscribe(Event, handle)
    for n in range(100):
        await bus.publish(Event(n))
    await bus.drain()
    failed = sorted(d.event.n for d in bus.dead_letters.list())
    assert failed == list(range(0, 100, 10))
    assert sorted(handled + failed) == list(range(100))  # nothing lost
    records = [r for r in caplog.records if r.name == "oxbus" and r.levelno == logging.ERROR]
    assert len(records) == 10
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in records)
    assert all(getattr(r, "correlation_id", None) for r in records)
    s = bus.get_statistics()
    assert s["events_processed"] == 100 and s["events_failed"] == 10


async def test_a_hanging_handler_with_a_timeout_does_not_stall_the_others(make_bus: Any) -> None:
    bus = await make_bus(workers=2)
    handled: list[int] = []

    async def handle(event: Event) -> None:
        if event.n == 0:
            await asyncio.Event().wait()  # never returns
        handled.append(event.n)

    bus.subscribe(Event, handle, timeout=0.1)
    for n in range(20):
        await bus.publish(Event(n))
    await bus.drain(timeout=10)
    assert sorted(handled) == list(range(1, 20))
    (dl,) = bus.dead_letters.list()
    assert (dl.event.n, dl.error_type) == (0, "TimeoutError")


async def test_a_hanging_handler_without_a_timeout_makes_drain_time_out_and_stop_cancel_it() -> None:
    bus = EventBus()
    observed: list[str] = []

    async def hangs(event: Event) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            observed.append("finally")

    bus.subscribe(Event, hangs)
    await bus.start()
    await bus.publish(Event(1))
    with pytest.raises(TimeoutError, match="1 in handlers"):
        await bus.drain(timeout=0.1)
    assert await bus.stop(timeout=0.1) == 1  # one handler call interrupted
    assert observed == ["finally"]


@pytest.mark.parametrize("sync_handlers", ["loop", "thread"])
async def test_a_handler_returning_a_plain_value_is_a_successful_sync_call(
    make_bus: Any, sync_handlers: str
) -> None:
    bus = await make_bus(sync_handlers=sync_handlers)
    ran: list[str] = []

    def returns_int(event: Event) -> int:
        ran.append("int")
        return 42

    class Callable_:
        def __call__(self, event: Event) -> object:
            ran.append("obj")
            return object()

    bus.subscribe(Event, returns_int)
    bus.subscribe(Event, Callable_())
    bus.subscribe(Event, lambda e: ran.append("lambda"))
    await bus.publish(Event(1))
    await bus.drain()
    assert ran == ["int", "obj", "lambda"]  # the return value is ignored
    assert len(bus.dead_letters) == 0 and bus.get_statistics()["events_failed"] == 0


async def test_a_sync_handler_on_the_loop_returning_a_coroutine_has_it_awaited(make_bus: Any) -> None:
    bus = await make_bus()
    ran: list[int] = []

    async def work(event: Event) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        ran.append(event.n)

    bus.subscribe(Event, lambda e: work(e))
    await bus.publish(Event(1))
    await bus.drain()
    assert ran == [1]


async def test_a_thread_pool_handler_returning_a_coroutine_has_it_awaited(
    make_bus: Any,
) -> None:
    # Dropping the coroutine would count a call that never did its work as a success (and
    # leave a "coroutine was never awaited" warning behind). The worker runs an awaitable
    # that a thread-pool handler hands back (src/python/worker/mod.rs).
    bus = await make_bus(sync_handlers="thread")
    ran: list[int] = []

    async def work(event: Event) -> None:
        ran.append(event.n)

    made: list[Any] = []

    def returns_coroutine(event: Event) -> Any:
        made.append(work(event))
        return made[-1]

    bus.subscribe(Event, returns_coroutine, name="returns_coroutine")
    await bus.publish(Event(1))
    await bus.drain()
    for coro in made:
        coro.close()  # keep a dropped coroutine's warning out of the other tests
    assert ran == [1], "the returned coroutine was not awaited"
    assert bus.dead_letters.list() == []
    stats = bus.get_statistics()
    assert (stats["events_processed"], stats["events_failed"]) == (1, 0)


async def test_an_async_generator_handler_is_refused_at_subscribe_naming_it(
    make_bus: Any,
) -> None:
    # Called, it would return a generator without running its body: a call counted as a
    # success that did nothing. subscribe() refuses it at once instead.
    bus = await make_bus()

    async def agen_handler(event: Event) -> Any:
        yield None

    with pytest.raises(InvalidSubscription) as info:
        bus.subscribe(Event, agen_handler, name="agen")
    assert isinstance(info.value, TypeError)
    assert "agen_handler is a generator function" in str(info.value)
    assert bus.get_statistics()["subscription_count"] == 0


async def test_a_handler_raising_cancelled_error_itself_is_a_failure_not_a_shutdown(
    make_bus: Any,
) -> None:
    bus = await make_bus()
    handled: list[int] = []

    async def handle(event: Event) -> None:
        if event.n == 1:
            raise asyncio.CancelledError("handler gave up")
        handled.append(event.n)

    bus.subscribe(Event, handle)
    for n in (1, 2, 3):
        await bus.publish(Event(n))
    await bus.drain(timeout=10)
    assert handled == [2, 3]
    (dl,) = bus.dead_letters.list()
    assert dl.error_type.endswith("CancelledError")
    assert bus.is_running


async def test_a_handler_raising_another_base_exception_does_not_wedge_the_bus_silently(
    make_bus: Any,
) -> None:
    # KeyboardInterrupt and SystemExit end the program (tested in a subprocess below). Any
    # other BaseException subclass must either be handled as a failure (the bus goes on) or
    # surface: what it may not do is end a worker quietly, leaving a "healthy" bus whose
    # queued events are never handled and whose drain() never returns.
    bus = await make_bus()
    handled: list[int] = []

    async def handle(event: Event) -> None:
        if event.n == 1:
            raise Fatal("fatal")
        handled.append(event.n)

    bus.subscribe(Event, handle, name="fatal")
    await bus.publish(Event(1))
    await bus.publish(Event(2))
    try:
        await bus.drain(timeout=3)
    except TimeoutError:
        h = bus.get_health_status()
        pytest.fail(
            f"Fatal ended a worker silently: event 2 never handled, drain() hangs, "
            f"health says {h['status']!r} {h['reasons']}"
        )
    except (Fatal, OxbusError):
        return  # surfaced to the caller
    assert handled == [2]
    assert [(d.event.n, d.error_type.rsplit(".", 1)[-1]) for d in bus.dead_letters.list()] == [
        (1, "Fatal")
    ]


BASE_EXC_SCRIPT = """
import asyncio, sys
from oxbus import EventBus

kind, mode = sys.argv[1], sys.argv[2]
exc = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[kind]

async def main():
    bus = EventBus(workers=2, sync_handlers="thread" if mode == "thread" else "loop")

    async def async_handler(event):
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
        raise exc(3)

    def sync_handler(event):
        raise exc(3)

    bus.subscribe("tick", async_handler if mode == "async" else sync_handler)
    await bus.start()
    await bus.publish({"event_type": "tick"})
    await bus.drain(timeout=20)
    print("UNREACHED", flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("mode", ["async", "sync", "thread"])
@pytest.mark.parametrize("kind,code", [("KeyboardInterrupt", 130), ("SystemExit", 3)])
def test_keyboard_interrupt_and_system_exit_in_a_handler_end_the_program(
    kind: str, code: int, mode: str
) -> None:
    p = run_script(BASE_EXC_SCRIPT, kind, mode, timeout=60)
    no_crash(p)
    assert "UNREACHED" not in p.stdout
    # An uncaught KeyboardInterrupt ends CPython by SIGINT (-2 here, 130 in a shell).
    codes = {code, -2} if kind == "KeyboardInterrupt" else {code}
    assert p.returncode in codes, p.stderr[-2000:]
    if kind == "KeyboardInterrupt":
        assert p.stderr.rstrip().endswith("KeyboardInterrupt: 3"), p.stderr[-2000:]


# =============================================================================================
# Bad events
# =============================================================================================


async def test_publishing_none_is_refused_by_every_publish_call(make_bus: Any) -> None:
    bus = await make_bus()
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n))
    with pytest.raises(InvalidEvent, match="None"):
        await bus.publish(None)
    with pytest.raises(InvalidEvent, match="None"):
        bus.publish_nowait(None)
    with pytest.raises(TypeError, match="None"):  # InvalidEvent is a TypeError
        await bus.publish_many([None])
    fut = bus.publish_threadsafe(None)
    with pytest.raises(InvalidEvent):
        await asyncio.wrap_future(fut)
    assert bus.get_statistics()["events_published"] == 0
    await bus.publish(Event(1))
    await bus.drain()
    assert seen == [1]


async def test_an_unhashable_key_is_refused_and_the_bus_goes_on(make_bus: Any) -> None:
    bus = await make_bus(workers=2)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n))
    with pytest.raises(InvalidEvent, match=r"unhashable") as e:
        await bus.publish(Event(1), key=[{}])  # a list is a tuple key; this one holds a dict
    assert "[{}]" in str(e.value) and "list" in str(e.value)
    with pytest.raises(InvalidEvent, match="dict"):
        await bus.publish(Event(2, key={"a": 1}))  # an unhashable aggregate_id
    with pytest.raises(InvalidEvent):
        bus.publish_nowait(Event(3), key=set())
    assert bus.get_statistics()["events_published"] == 0
    await bus.publish(Event(4), key=(1, 2))  # a hashable key is fine
    await bus.drain()
    assert seen == [4]


async def test_a_bad_event_inside_publish_many_loses_nothing_silently(make_bus: Any) -> None:
    bus = await make_bus(workers=2)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n))
    batch = [Event(1), Event(2), Event(3, key={1}), Event(4)]
    with pytest.raises(InvalidEvent, match=r"key \{1\} \(type set\) is unhashable"):
        await bus.publish_many(batch)
    await bus.drain()
    # In memory, publish_many accepts the events in order up to the bad one (the durable bus
    # commits the group atomically instead): those are handled; the bad one and the rest are
    # not.
    assert seen == [1, 2]
    assert bus.get_statistics()["events_published"] == 2


async def test_an_event_over_max_event_bytes_is_refused_naming_its_size(make_bus: Any) -> None:
    bus = await make_bus(max_event_bytes=1000)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n))
    with pytest.raises(InvalidEvent, match="max_event_bytes=1000") as e:
        await bus.publish(Event(1, payload="x" * 5000))
    assert "Event" in str(e.value)
    with pytest.raises(InvalidEvent, match="max_event_bytes"):
        bus.publish_nowait(Event(2, payload="x" * 5000))
    with pytest.raises(InvalidEvent, match="max_event_bytes"):
        await asyncio.wrap_future(bus.publish_threadsafe(Event(3, payload="x" * 5000)))
    await bus.publish(Event(4, payload="small"))
    await bus.drain()
    assert seen == [4]


@pytest.mark.parametrize("durable", [False, True], ids=["in-memory", "durable"])
async def test_publish_many_also_refuses_events_over_max_event_bytes(
    make_bus: Any, tmp_path: Path, durable: bool
) -> None:
    path = tmp_path / "many.db"
    bus = await make_bus(max_event_bytes=1000, **({"store": path} if durable else {}))
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n), name="h")
    with pytest.raises(InvalidEvent, match="max_event_bytes"):
        await bus.publish_many([Event(1, payload="x" * 5000)])
    await bus.drain()
    assert seen == []
    if durable:
        await bus.stop()
        with SqliteEventStore(str(path)) as store:
            assert await store.read_all() == []  # nothing written either


async def test_max_event_bytes_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    bus = EventBus(store=tmp_path / "big.db", max_event_bytes=1000)
    bus.subscribe(Event, lambda e: None, name="h")
    await bus.start()
    try:
        with pytest.raises(InvalidEvent):
            await bus.publish(Event(1, payload="x" * 5000))
        await bus.publish(Event(2))
        await bus.drain()
    finally:
        await bus.stop()
    with SqliteEventStore(str(tmp_path / "big.db")) as store:
        assert [s.data["n"] for s in await store.read_all()] == [2]


def test_max_event_bytes_must_be_a_positive_int() -> None:
    for bad in (0, -1, 1.5, "10"):
        with pytest.raises(ValueError, match="max_event_bytes"):
            EventBus(max_event_bytes=bad)  # type: ignore[arg-type]


async def test_an_event_that_cannot_be_encoded_is_refused_by_a_durable_bus_and_not_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "enc.db"
    bus = EventBus(store=path)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n), name="h")
    await bus.start()
    try:
        with pytest.raises(SerializationError) as e:
            await bus.publish(Event(1, payload={"inner": [1, object()]}))
        msg = str(e.value)
        assert "payload" in msg and "object" in msg  # names the field path and the type
        with pytest.raises(SerializationError):
            await bus.publish_many([Event(2), Event(3, payload=1 + 2j), Event(4)])
        await bus.drain()
        assert seen == []
        assert bus.get_statistics()["events_published"] == 0
        await bus.publish(Event(5))
        await bus.drain()
        assert seen == [5]
    finally:
        await bus.stop()
    with SqliteEventStore(str(path)) as store:
        assert [s.data["n"] for s in await store.read_all()] == [5]  # nothing else written


# =============================================================================================
# Misuse
# =============================================================================================


@pytest.mark.parametrize("value", [None, 42, "handler", object()])
def test_subscribing_a_non_callable_is_a_typed_error(value: Any) -> None:
    bus = EventBus()
    with pytest.raises(InvalidSubscription, match="callable"):
        bus.subscribe(Event, value)
    assert bus.subscriptions() == []


async def test_double_start_is_idempotent_and_handles_each_event_once() -> None:
    bus = EventBus(workers=2)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n))
    await bus.start()
    await bus.start()
    try:
        assert bus.get_statistics()["worker_count"] == 2
        tasks = [t for t in asyncio.all_tasks() if (t.get_name() or "").startswith("oxbus-worker")]
        assert len(tasks) == 2
        for n in range(10):
            await bus.publish(Event(n))
        await bus.drain()
        assert sorted(seen) == list(range(10))
    finally:
        await bus.stop()


async def test_stop_before_start_is_a_no_op_and_the_bus_can_still_start() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n))
    assert await bus.stop() == 0
    assert await bus.stop(drain=False) == 0
    await bus.start()
    try:
        await bus.publish(Event(1))
        await bus.drain()
        assert seen == [1]
    finally:
        await bus.stop()


async def test_publish_before_start_and_after_stop_are_typed_errors() -> None:
    bus = EventBus()
    bus.subscribe(Event, lambda e: None)
    with pytest.raises(BusNotStarted):
        await bus.publish(Event(1))
    with pytest.raises(RuntimeError):
        bus.publish_nowait(Event(1))
    await bus.start()
    await bus.stop()
    with pytest.raises(BusClosed):
        await bus.publish(Event(2))
    with pytest.raises(BusClosed):
        bus.publish_nowait(Event(3))
    with pytest.raises(BusClosed):
        await bus.publish_many([Event(4)])
    assert await bus.stop() == 0  # stop twice: fine


async def test_publish_after_stop_on_a_durable_bus_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "closed.db"
    store = SqliteEventStore(str(path))
    bus = EventBus(store=store)
    bus.subscribe(Event, lambda e: None, name="h")
    await bus.start()
    await bus.publish(Event(1))
    await bus.stop()
    with pytest.raises(BusClosed):
        await bus.publish(Event(2))
    with pytest.raises(BusClosed):
        await bus.publish_many([Event(3)])
    assert [s.data["n"] for s in await store.read_all()] == [1]
    store.close()


# =============================================================================================
# The SQLite file
# =============================================================================================


async def test_the_file_deleted_under_an_open_store_keeps_working_on_the_unlinked_inode(
    tmp_path: Path,
) -> None:
    # Stated behaviour: SQLite keeps its open file descriptor, so appends and reads go on
    # working (on the unlinked inode, whose data is gone once the store closes); nothing
    # crashes and nothing raises anything but a StorageError.
    path = tmp_path / "gone.db"
    store = SqliteEventStore(str(path))
    await store.append("s", [Event(1)], expected_version=0)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    try:
        version = await store.append("s", [Event(2)], expected_version=1)
    except StorageError as e:
        assert str(path) in str(e)
    else:
        assert version == 2
        assert [s.data["n"] for s in await store.read("s")] == [1, 2]
    store.close()
    assert not path.exists()


async def test_the_file_deleted_under_a_durable_bus_loses_no_accepted_event(tmp_path: Path) -> None:
    path = tmp_path / "gone-bus.db"
    bus = EventBus(store=path)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n), name="h")
    await bus.start()
    try:
        await bus.publish(Event(1))
        path.unlink()
        accepted = [1]
        try:
            await bus.publish(Event(2))
            accepted.append(2)
        except StorageError:
            pass
        await bus.drain(timeout=10)
        assert seen == accepted
    finally:
        await bus.stop()


READ_ONLY_SCRIPT = """
import asyncio, os, sys
import oxbus.store, oxbus.registry            # everything imported before dropping privileges
from oxbus import SqliteEventStore, StorageError

path = sys.argv[1]
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)                          # nobody: file permissions now apply

async def main():
    try:
        store = SqliteEventStore(path)
    except StorageError as e:
        print("OPEN", "StorageError", e, flush=True)
        return
    try:
        await store.append("s", [{"event_type": "FltRo", "n": 1}], expected_version=None)
        print("WROTE", flush=True)
    except StorageError as e:
        print("WRITE", "StorageError", e, flush=True)
    finally:
        store.close()

asyncio.run(main())
"""


def test_a_read_only_file_gives_a_storage_error_on_open_or_write() -> None:
    base = Path(tempfile.mkdtemp(prefix="oxbus-ro-"))
    try:
        base.chmod(0o755)  # traversable, not writable, by an unprivileged user
        path = base / "ro.db"
        with SqliteEventStore(str(path)):
            pass
        for f in base.iterdir():
            f.chmod(0o444)
        if os.geteuid() == 0:
            # chmod does not stop root: the script drops to "nobody" before opening.
            probe = run_script("import os; os.setuid(65534); print('ok')")
            if probe.returncode != 0:
                unavailable(f"running as root and cannot drop privileges: {probe.stderr[-300:]}")
        p = run_script(READ_ONLY_SCRIPT, str(path))
        no_crash(p)
        assert p.returncode == 0, p.stderr[-2000:]
        assert "StorageError" in p.stdout and str(path) in p.stdout, p.stdout + p.stderr[-2000:]
        assert "WROTE" not in p.stdout
    finally:
        for f in base.iterdir():
            f.chmod(0o644)
        shutil.rmtree(base)


LOCK_HOLDER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
if sys.argv[2] == "stdin":
    sys.stdin.readline()
else:
    time.sleep(float(sys.argv[2]))  # sleep-ok: the child holds the lock this long
c.execute("COMMIT")
print("released", flush=True)
"""


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def hold(path: Path, how: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [PY, "-c", LOCK_HOLDER, str(path), how],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        return p

    yield hold
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdin, p.stdout):
            if f is not None:
                f.close()


async def test_a_file_locked_by_another_process_raises_storage_error_after_the_busy_timeout(
    tmp_path: Path, lock_holder: Any
) -> None:
    path = tmp_path / "locked.db"
    store = SqliteEventStore(str(path))
    try:
        await store.append("s", [Event(1)], expected_version=0)
        holder = lock_holder(path, "stdin")
        with pytest.raises(StorageError, match="locked"):
            # A hang guard, not a limit: the store gives up after its busy timeout.
            await asyncio.wait_for(store.append("s", [Event(2)], expected_version=1), 60)
        # Readers are not blocked in WAL mode.
        assert [s.data["n"] for s in await store.read("s")] == [1]
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        # Recovery: the store works again once the lock is gone, and the failed append
        # left nothing behind.
        assert await store.append("s", [Event(3)], expected_version=1) == 2
        assert [s.data["n"] for s in await store.read("s")] == [1, 3]
    finally:
        store.close()


async def test_a_short_lock_by_another_process_is_waited_out(
    tmp_path: Path, lock_holder: Any
) -> None:
    path = tmp_path / "briefly.db"
    bus = EventBus(store=path)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n), name="h")
    await bus.start()
    try:
        await bus.publish(Event(1))
        lock_holder(path, "1.0")
        try:
            await asyncio.wait_for(bus.publish(Event(2)), 60)
            accepted = [1, 2]
        except StorageError:
            accepted = [1]
        await bus.drain(timeout=10)
        assert seen == accepted
        assert accepted == [1, 2], "a 1 s lock is within the busy timeout: the append waits"
    finally:
        await bus.stop()


async def test_a_durable_publish_refused_by_a_lock_is_not_dispatched(
    tmp_path: Path, lock_holder: Any
) -> None:
    path = tmp_path / "locked-bus.db"
    bus = EventBus(store=path)
    seen: list[int] = []
    bus.subscribe(Event, lambda e: seen.append(e.n), name="h")
    await bus.start()
    try:
        await bus.publish(Event(1))
        holder = lock_holder(path, "stdin")
        with pytest.raises(StorageError):
            await asyncio.wait_for(bus.publish(Event(2)), 60)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        await bus.publish(Event(3))
        await bus.drain(timeout=10)
        assert seen == [1, 3]  # the refused event was neither committed nor handled
    finally:
        await bus.stop()


@pytest.mark.parametrize("size", [64, 8192, 100_000])
def test_a_corrupt_file_is_a_storage_error_naming_the_path_at_open(tmp_path: Path, size: int) -> None:
    path = tmp_path / f"corrupt-{size}.db"
    path.write_bytes(os.urandom(size))
    with pytest.raises(StorageError) as e:
        SqliteEventStore(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(StorageError):
        EventBus(store=path)


def test_a_directory_in_place_of_the_file_is_a_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "a-directory.db"
    path.mkdir()
    with pytest.raises(StorageError) as e:
        SqliteEventStore(str(path))
    assert str(path) in str(e.value)


DISK_FULL_SCRIPT = """
import asyncio, os, resource, signal, sys
from oxbus import DomainEvent, EventBus, SqliteEventStore, StorageError

mode, path, ballast = sys.argv[1], sys.argv[2], sys.argv[3]

class Blob(DomainEvent):
    def __init__(self, n, data):
        super().__init__()
        self.n = n
        self.data = data

async def main():
    bus = EventBus(store=path)
    seen = []
    bus.subscribe(Blob, lambda e: seen.append(e.n), name="h")
    await bus.start()
    if mode == "rlimit":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # EFBIG instead of a signal
        limit = os.path.getsize(path) + 400_000
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    accepted, error = 0, None
    for i in range(5000):
        try:
            await bus.publish(Blob(i, "x" * 20_000))
        except StorageError as e:
            error = e
            break
        accepted += 1
    await bus.drain(timeout=20)
    print("ERROR", type(error).__name__, error, flush=True)
    print("ACCEPTED", accepted, "HANDLED", len(seen), "IN_ORDER", seen == list(range(accepted)), flush=True)
    # Room again: the bus recovers.
    if mode == "rlimit":
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    else:
        os.unlink(ballast)
    await bus.publish(Blob(accepted, "after"))
    await bus.drain(timeout=20)
    print("RECOVERED", seen[-1] == accepted, flush=True)
    await bus.stop()
    with SqliteEventStore(path) as store:
        print("LOGGED", len(await store.read_all(limit=100_000)), flush=True)

asyncio.run(main())
"""


def _check_disk_full(p: subprocess.CompletedProcess[str]) -> None:
    no_crash(p)
    assert p.returncode == 0, p.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in p.stdout.splitlines() if " " in line)
    assert out["ERROR"].startswith("StorageError"), p.stdout
    accepted = int(out["ACCEPTED"].split()[0])
    assert accepted > 0
    assert out["ACCEPTED"] == f"{accepted} HANDLED {accepted} IN_ORDER True", p.stdout
    assert out["RECOVERED"] == "True", p.stdout
    assert out["LOGGED"] == str(accepted + 1), p.stdout


def test_a_full_disk_on_a_small_tmpfs_is_a_storage_error_with_recovery(tmp_path: Path) -> None:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    m = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True, text=True, check=False,
    )
    if m.returncode != 0:
        unavailable(
            "cannot mount a tmpfs here (test_a_full_disk_simulated_with_rlimit_fsize covers "
            f"the case): {m.stderr.strip()}"
        )
    try:
        ballast = mnt / "ballast"
        ballast.write_bytes(b"\0" * 1_200_000)
        p = run_script(DISK_FULL_SCRIPT, "tmpfs", str(mnt / "full.db"), str(ballast), timeout=90)
        _check_disk_full(p)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_simulated_with_rlimit_fsize_is_a_storage_error_with_recovery(
    tmp_path: Path,
) -> None:
    p = run_script(DISK_FULL_SCRIPT, "rlimit", str(tmp_path / "fsize.db"), "-", timeout=90)
    _check_disk_full(p)


LOOP_CLOSED_SCRIPT = """
import asyncio, os, sys
from oxbus import DomainEvent, EventBus, SqliteEventStore

mode, path, ending = sys.argv[1], sys.argv[2], sys.argv[3]

class Lc(DomainEvent):
    def __init__(self, n):
        super().__init__()
        self.n = n

store = SqliteEventStore(path)
loop = asyncio.new_event_loop()
loop.run_until_complete(store.append("s", [Lc(0)], expected_version=0))
if mode == "bus":
    bus = EventBus(store=store)
    bus.subscribe(Lc, lambda e: None, name="h")
    loop.run_until_complete(bus.start())        # writes: before the lock is taken
# Another process holds the write lock, so the next request stays pending in the writer.
# (Another process, not a sqlite3 connection here: two SQLite libraries in one process do
# not see each other's locks.)
import subprocess
holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, path, "stdin"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
)
assert holder.stdout.readline().strip() == "locked"
if mode == "store":
    pending = loop.create_task(store.append("s", [Lc(1)], expected_version=1))
else:
    pending = loop.create_task(bus.publish(Lc(1)))
for _ in range(10):
    loop.run_until_complete(asyncio.sleep(0))   # sleep-ok: the request reaches the writer thread
print("PENDING", not pending.done(), flush=True)
if pending.done():
    print("OUTCOME", repr(pending.exception()), flush=True)
loop.close()                                    # the loop goes away under the store
holder.stdin.write("\\n")                       # the writer now answers into a closed loop
holder.stdin.close()
assert holder.stdout.readline().strip() == "released"
holder.stdout.close()
holder.wait()
if ending == "close":
    store.close()                               # finishes queued work, then returns
    print("CLOSED", flush=True)
print("END", flush=True)
"""


@pytest.mark.parametrize("ending", ["close", "exit"])
@pytest.mark.parametrize("mode", ["store", "bus"])
def test_the_loop_closed_under_a_pending_store_request_neither_crashes_nor_hangs(
    tmp_path: Path, mode: str, ending: str
) -> None:
    script = textwrap.dedent(LOOP_CLOSED_SCRIPT).replace("HOLDER", repr(LOCK_HOLDER), 1)
    p = run_script(script, mode, str(tmp_path / "lc.db"), ending, timeout=60)
    no_crash(p)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "PENDING True" in p.stdout and "END" in p.stdout, p.stdout + p.stderr[-2000:]
    if ending == "close":
        assert "CLOSED" in p.stdout
    # The pending append reached the file: committed once the lock was released.
    with sqlite3.connect(tmp_path / "lc.db") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM events").fetchone()
    db.close()  # the with block commits, it does not close (ResourceWarning on 3.13)
    assert count in (1, 2)
