"""Helpers shared by the broker tests (Redis Streams, RabbitMQ): a free port, a ``Tally`` of
handled event numbers, a counting and a failing handler, a started bus, a wait on the
transport's health, and consumer processes.

A consumer process runs its test module's ``CONSUMER`` script: it reports ``ready`` once it
consumes, then ``h <n>`` per handled event (and writes what it handled to its own file), and
on stdin EOF drains, stops its bus and reports ``bye {...}`` (its transport's counters).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest
from oxbus import EventBus

C = TypeVar("C", bound="ConsumerProcess")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


class Tally:
    """Handled event numbers (from any process), with waits on conditions over them."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.calls = 0
        self._waiters: list[tuple[Callable[[Tally], bool], asyncio.Event]] = []

    def add(self, n: int) -> None:
        self.calls += 1
        self.seen.add(n)
        for pred, ev in self._waiters:
            if pred(self):
                ev.set()

    async def until(self, pred: Callable[[Tally], bool], timeout: float, what: str) -> None:
        if pred(self):
            return
        ev = asyncio.Event()
        self._waiters.append((pred, ev))
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: "
                f"{len(self.seen)} distinct handled, {self.calls} calls"
            ) from None
        finally:
            self._waiters.remove((pred, ev))


def counted(n: int) -> tuple[list[Any], asyncio.Event, Callable[[Any], Any]]:
    """A handler recording events, and an asyncio.Event set once it saw n of them."""
    seen: list[Any] = []
    done = asyncio.Event()

    async def handle(event: Any) -> None:
        seen.append(event)
        if len(seen) >= n:
            done.set()

    return seen, done, handle


def failing(name: str, times: int) -> tuple[list[int], asyncio.Event, Callable[[Any], Any]]:
    """A handler that raises ``ValueError`` on its first ``times`` calls (then succeeds), and an
    asyncio.Event set at its last failing call."""
    calls: list[int] = []
    gave_up = asyncio.Event()

    async def handle(event: Any) -> None:
        calls.append(event.n)
        if len(calls) <= times:
            if len(calls) == times:
                gave_up.set()
            raise ValueError(f"{name} refuses {event.n}")

    return calls, gave_up, handle


async def started(**kwargs: Any) -> EventBus:
    bus = EventBus(**kwargs)
    await bus.start()
    return bus


async def health_until(
    bus: EventBus, pred: Callable[[dict[str, Any]], bool], polls: int
) -> dict[str, Any]:
    """The transport's part of the bus's health once ``pred`` holds of it. The broker is read
    every ~2 s in the background: this polls, every 50 ms, ``polls`` times at most."""
    for _ in range(polls):
        t: dict[str, Any] = bus.get_health_status()["transport"]
        if pred(t):
            return t
        await asyncio.sleep(0.05)  # sleep-ok: waiting for the periodic health reading
    raise AssertionError(f"health never matched: {t}")


class ConsumerProcess:
    """A consumer subprocess running ``script`` (its test module's ``CONSUMER``), the numbers
    it reports handled fed to a Tally and kept in ``reported``."""

    script: ClassVar[str]

    def __init__(self, proc: asyncio.subprocess.Process, out: Path, tally: Tally) -> None:
        self.proc = proc
        self.out = out
        self.tally = tally
        self.reported: list[int] = []
        self.bye: dict[str, Any] | None = None
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def launch(cls: type[C], tmp: Path, tally: Tally, name: str, cfg: dict[str, Any]) -> C:
        """Starts the consumer ``name`` with the settings ``cfg`` (its file of handled events
        added); returns once it reported ``ready``."""
        script = tmp / "consumer.py"
        if not script.exists():
            script.write_text(cls.script)
        out = tmp / f"{name}.handled"
        cfg["out"] = str(out)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self = cls(proc, out, tally)
        _live.append(self)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line == b"ready\n", f"consumer {name} did not start: {line!r}"
        self._reader = asyncio.get_running_loop().create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"h "):
                n = int(line[2:])
                self.reported.append(n)
                self.tally.add(n)
            elif line.startswith(b"bye "):
                self.bye = json.loads(line[4:])

    async def stop(self) -> None:
        """Closes its stdin: it drains, stops its bus and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        rc = await asyncio.wait_for(self.proc.wait(), 60)
        if self._reader is not None:
            await self._reader
        assert rc == 0, f"consumer exited with {rc}"

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self._reader is not None:
            await self._reader


_live: list[ConsumerProcess] = []


@pytest.fixture(autouse=True)
async def reap_consumers() -> Any:
    """No consumer process outlives its test (import it into the test module)."""
    yield
    while _live:
        await _live.pop().kill()
