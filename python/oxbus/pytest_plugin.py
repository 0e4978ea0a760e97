"""The oxbus pytest plugin (loaded by pytest through the ``pytest11`` entry point).

Fixtures:

* ``event_bus`` — a started :class:`~oxbus.EventBus`; after the test it is drained (so a
  handler's failure to finish shows up as a teardown error) and stopped. Configure it by
  overriding ``event_bus_options`` (keywords for ``EventBus``) in a conftest or module.
* ``event_recorder`` — an :class:`oxbus.testing.EventRecorder` on that bus: every event it
  accepts, in order (``recorder.events``, ``recorder.of_type(Cls)``, ``recorder.clear()``,
  ``await recorder.wait_for(Cls, predicate, timeout)``).

::

    async def test_a_receipt_follows_each_order(event_bus, event_recorder):
        event_bus.subscribe(OrderPlaced, send_receipt)
        await event_bus.publish(OrderPlaced("o-1", 9.5))
        receipt = await event_recorder.wait_for(ReceiptSent)
        assert receipt.order_id == "o-1"

The fixtures are async; pytest-asyncio runs them (``asyncio_mode = "auto"`` or strict —
they are declared with ``pytest_asyncio.fixture`` when it is installed), for async tests
and for plain ``def`` tests alike.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Callable, Iterator, TypeVar, cast

import pytest

from oxbus.bus import EventBus
from oxbus.testing import EventRecorder

__all__ = ["DRAIN_TIMEOUT", "event_bus", "event_bus_options", "event_recorder"]

#: Seconds the teardown waits for the bus to drain before it reports a teardown error
#: (the ``oxbus_drain_timeout`` ini option overrides it).
DRAIN_TIMEOUT = 10.0

F = TypeVar("F", bound=Callable[..., Any])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "oxbus_drain_timeout",
        "seconds the event_bus fixture waits for the bus to drain after each test",
        default=str(DRAIN_TIMEOUT),
    )


def _async_fixture(fn: F) -> F:
    try:
        import pytest_asyncio
    except ImportError:  # another plugin (anyio's, for instance) runs async fixtures
        return cast(F, pytest.fixture(fn))
    return cast(F, pytest_asyncio.fixture(fn))


@pytest.fixture
def event_bus_options() -> dict[str, Any]:
    """Keywords for the ``event_bus`` fixture's ``EventBus``; override it to configure::

    @pytest.fixture
    def event_bus_options():
        return {"workers": 4, "max_queue_size": 100}
    """
    return {}


@_async_fixture
async def event_bus(
    event_bus_options: dict[str, Any], pytestconfig: pytest.Config
) -> AsyncIterator[EventBus]:
    """A started ``EventBus``, drained and stopped after the test (a drain that times out
    is a teardown error naming what was still queued or running)."""
    timeout = float(pytestconfig.getini("oxbus_drain_timeout"))
    options = dict(event_bus_options)
    cls = options.pop("cls", EventBus)
    bus: EventBus = cls(**options)
    await bus.start()
    try:
        yield bus
    finally:
        if bus.is_running:
            try:
                await bus.drain(timeout=timeout)
            finally:
                # Drained, or the drain failed: what still runs is cancelled at once.
                await bus.stop(timeout=0, drain=False)


@pytest.fixture
def event_recorder(event_bus: EventBus) -> Iterator[EventRecorder]:
    """Every event the ``event_bus`` accepts during the test, in order."""
    recorder = EventRecorder(event_bus)
    try:
        yield recorder
    finally:
        recorder.close()
