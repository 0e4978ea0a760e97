"""Events, exceptions and helpers shared by the failure-handling tests (retry, dead letters,
parking, timeouts, circuit breaker, shutdown).

Backoff and cool-downs run on ``oxbus.testing.ManualClock`` (``await clock.drain(bus)``), so a
schedule of seconds completes in no real time and every call time is exact.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any, Callable

import pytest
from oxbus import (
    DomainEvent,
    RetryPolicy,
)


class Job(DomainEvent):
    """A numbered job; ``key`` is its ordering key (``aggregate_id``)."""

    def __init__(self, n: int, key: str | None = None) -> None:
        super().__init__()
        self.n = n
        self.key = key

    @property
    def aggregate_id(self) -> str | None:
        return self.key


class Other(DomainEvent):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n


class PaymentDeclined(Exception):
    """A user exception, for the qualified ``error_type``."""


class Outer:
    class Nested(Exception):
        """A nested user exception: its qualified name includes the outer class."""


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Lets the loop run until ``cond()`` holds (a bound on real time, for conditions set by
    threads or by the bus's own tasks, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)  # sleep-ok: the handler's simulated work


async def turns(n: int = 20) -> None:
    """Lets every ready task run ``n`` loop turns (no time passes on any clock)."""
    for _ in range(n):
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus


def policy(**kw: Any) -> RetryPolicy:
    kw.setdefault("jitter", 0.0)
    return RetryPolicy(**kw)


def utc(dt: datetime) -> bool:
    return dt.tzinfo is not None and dt.utcoffset() == timedelta(0)


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Handler failures are logged at ERROR with a traceback: expected here, kept out of output.
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")
