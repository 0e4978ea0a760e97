"""A bank account: an event-sourced aggregate with snapshots and optimistic concurrency.

Run: .venv/bin/python examples/bank_account.py
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass

from oxbus import ConcurrencyError, DomainEvent, SqliteEventStore
from oxbus.aggregate import Aggregate, Repository


@dataclass(frozen=True)
class Deposited(DomainEvent):
    amount: int


@dataclass(frozen=True)
class Withdrawn(DomainEvent):
    amount: int


class Account(Aggregate):
    balance = 0

    def deposit(self, amount: int) -> None:
        self.record(Deposited(amount))

    def withdraw(self, amount: int) -> None:
        if amount > self.balance:
            raise ValueError(f"insufficient funds: balance {self.balance}, asked {amount}")
        self.record(Withdrawn(amount))

    def on_Deposited(self, e: Deposited) -> None:
        self.balance += e.amount

    def on_Withdrawn(self, e: Withdrawn) -> None:
        self.balance -= e.amount


async def main() -> None:
    path = os.path.join(tempfile.mkdtemp(), "bank.db")
    async with SqliteEventStore(path) as store:
        repo = Repository(store, Account, snapshot_every=10)
        acc = await repo.load("alice")
        for i in range(25):
            acc.deposit(10)
        acc.withdraw(30)
        await repo.save(acc)
        print(f"saved alice at version {acc.version}, balance {acc.balance}")
        snap = await store.load_snapshot(repo.stream_id("alice"))
        assert snap is not None
        print(f"snapshot at version {snap.version}: {snap.state}")

        again = await repo.load("alice")  # snapshot + the events after it
        print(f"reloaded: version {again.version}, balance {again.balance}")

        a, b = await repo.load("alice"), await repo.load("alice")
        a.deposit(1)
        b.deposit(2)
        await repo.save(a)
        try:
            await repo.save(b)
        except ConcurrencyError as e:
            print(f"second writer refused: {e}")
    os.remove(path)  # closed: the file can go at once


if __name__ == "__main__":
    asyncio.run(main())
