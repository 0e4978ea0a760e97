"""The durable log under faults and bad input (issue 11: items 3, 5, 6, 8 and the storage parts
of 9). Every test here failed before the change it guards."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from oxbus import SqliteEventStore
from oxbus.errors import ConcurrencyError


# ------------------------------------------------------------ item 8: loops and threads


def test_a_store_shared_by_two_event_loops_completes_every_await(tmp_path: Path) -> None:
    # The case: one stream, both appends expecting the same version (one conflicts).
    store = SqliteEventStore(str(tmp_path / "shared.db"))
    hung: list[int] = []
    errors: list[BaseException] = []
    try:
        for rnd in range(400):
            def append(i: int, rnd: int = rnd) -> None:
                try:
                    asyncio.run(store.append("s", [{"event_type": "T", "i": i}], expected_version=rnd))
                except ConcurrencyError:
                    pass  # the other thread appended first: decided, and reported
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=append, args=(i,), daemon=True) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=10)
            if any(t.is_alive() for t in threads):
                hung.append(rnd)
                break
        assert not hung, f"round {hung[0]}: an await on a shared store never returned"
        assert not errors, errors[:3]
    finally:
        store.close()
