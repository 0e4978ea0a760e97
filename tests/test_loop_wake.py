"""How a loop learns that the writer thread committed (src/python/wake.rs): each loop gets a
socket it watches, and the writer hands it finished futures without the GIL; a loop that cannot
watch a descriptor gets them through `call_soon_threadsafe`. Either way every awaited commit
settles on its own loop, and a loop leaves no descriptor behind once it is gone."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from pathlib import Path
from typing import Any

from oxbus import DomainEvent, EventBus, SqliteEventStore


class Noted(DomainEvent):
    def __init__(self, key: str, n: int) -> None:
        super().__init__()
        self.key = key
        self.n = n

    @property
    def aggregate_id(self) -> str:
        return self.key


async def commits(path: Path, n: int) -> tuple[list[int], list[int]]:
    """`n` appends and `n` publishes at synchronous=FULL (every commit on the writer thread),
    from 4 tasks; returns the stream versions the appends got and the events handled."""
    store = SqliteEventStore(str(path), synchronous="full")
    bus = EventBus(store=store)
    handled: list[int] = []

    async def handler(e: Noted) -> None:
        handled.append(e.n)

    bus.subscribe(Noted, handler, name="wake")
    positions: list[int] = []
    async with bus:

        async def task(k: int) -> None:
            for i in range(k, n, 4):
                positions.append(await store.append(f"s{i % 3}", [Noted("a", i)]))
                await bus.publish(Noted(f"k{i % 5}", i))

        await asyncio.gather(*(task(k) for k in range(4)))
        await bus.drain()
    store.close()
    return positions, handled


def expected_versions(n: int) -> list[int]:
    """The stream versions `commits` gets back: appends go to three streams in turn."""
    return sorted(v for s in range(3) for v in range(1, len(range(s, n, 3)) + 1))


class NoReaders(asyncio.SelectorEventLoop):
    """A loop that cannot watch descriptors for others (as Windows' proactor loop)."""

    refused = 0

    def add_reader(self, *args: Any, **kwargs: Any) -> None:
        NoReaders.refused += 1
        raise NotImplementedError("no add_reader on this loop")


def test_a_loop_that_cannot_watch_a_descriptor_still_gets_every_commit(tmp_path: Path) -> None:
    loop = NoReaders()
    try:
        positions, handled = loop.run_until_complete(commits(tmp_path / "no-readers.db", 200))
    finally:
        loop.close()
    assert NoReaders.refused >= 1, "the wake-up was never tried on this loop"
    assert sorted(positions) == expected_versions(200)
    assert sorted(handled) == list(range(200))


def test_loops_that_are_gone_leave_no_descriptor_behind(tmp_path: Path) -> None:
    def open_fds() -> int:
        gc.collect()
        return len(os.listdir("/proc/self/fd"))

    asyncio.run(commits(tmp_path / "warm.db", 8))  # imports, the runtime's threads
    before = open_fds()
    for k in range(20):
        positions, handled = asyncio.run(commits(tmp_path / f"run{k}.db", 8))
        assert sorted(positions) == expected_versions(8) and sorted(handled) == list(range(8))
    grown = open_fds() - before
    # Each loop had its own socket pair (two descriptors): 40 if none were closed. (Closed
    # loops are forgotten when the next one comes, collected or not.)
    assert grown < 10, f"{grown} descriptors more after 20 loops came and went"


def test_loops_on_several_threads_each_get_their_own_commits(tmp_path: Path) -> None:
    results: dict[int, tuple[list[int], list[int]]] = {}
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            results[k] = asyncio.run(commits(tmp_path / f"thread{k}.db", 100))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2]
    for positions, handled in results.values():
        assert sorted(positions) == expected_versions(100)
        assert sorted(handled) == list(range(100))
