"""Shared fixtures for the oxbus suite.

Tests go through the public API (``import oxbus``) and wait with ``await bus.drain()``,
never with sleeps (STYLE.md, convention 8). Every test runs in its own view of the event
registry (the plugin's ``event_registry`` fixture, made automatic here): the event classes of
the test module and of the helpers it imports from win over same-named ones of other modules, and classes a test defines are
forgotten after it, so event classes need no unique names.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import pytest

from _env import unavailable
from _redis import Resp, redis_ping
from oxbus import EventBus


@pytest.fixture(autouse=True)
def _registry(event_registry: None) -> None:
    """Each test in its own view of the event registry (see the module docstring)."""


@pytest.fixture
async def make_bus() -> Any:
    """A factory of started buses, each stopped (drained, with a bounded wait) after the test.

    ``await make_bus(workers=4)`` returns a started ``EventBus``; ``cls=`` picks another class.
    """
    buses: list[EventBus] = []

    async def make(cls: type[EventBus] = EventBus, **kwargs: Any) -> EventBus:
        bus = cls(**kwargs)
        buses.append(bus)
        await bus.start()
        return bus

    yield make
    for bus in buses:
        await bus.stop(timeout=5)


class Recorder:
    """Collects what handlers saw: ``rec.handler(tag)`` gives an async handler that appends."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def handler(self, tag: str | None = None) -> Callable[[Any], Awaitable[None]]:
        async def record(event: Any) -> None:
            self.seen.append(event if tag is None else (tag, event))

        record.__qualname__ = f"record_{tag}"
        return record


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def redis_up() -> None:
    """The Redis tests' server (127.0.0.1:6379) answers, else they are skipped (failed under
    ``OXBUS_CI=1``)."""
    reason = redis_ping()
    if reason is not None:
        unavailable(reason)


@pytest.fixture
def rds(redis_up: None) -> Any:
    """A RESP connection to the shared Redis."""
    r = Resp()
    yield r
    r.close()
