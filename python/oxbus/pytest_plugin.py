"""The oxbus pytest plugin (loaded by pytest through the ``pytest11`` entry point).

Fixtures:

* ``event_bus`` — a started [`EventBus`][oxbus.EventBus]; after the test it is drained (so a
  handler's failure to finish shows up as a teardown error) and stopped. A handler call that
  raised during the test (dead-lettered or not) fails the test at teardown, with the original
  traceback, unless the test expected it: ``@pytest.mark.oxbus(allow_errors=True)``, or the
  failures taken with ``handler_errors.take()``. Handler calls are recorded
  (``event_recorder.calls(handler)``, ``assert_handled``). Configure the bus by overriding
  ``event_bus_options`` (keywords for ``EventBus``) in a conftest or module.
* ``event_recorder`` — an [`EventRecorder`][oxbus.testing.EventRecorder] on that bus: every event it
  accepts, in order (``recorder.events``, ``recorder.of_type(Cls)``, ``recorder.clear()``,
  ``await recorder.first(Cls, predicate, timeout)`` — recorded already or next;
  ``await recorder.wait_for(...)`` — next, as ``bus.wait_for``), and the calls of its
  handlers (``recorder.calls(handler)``, ``await recorder.assert_handled(handler, event)``).
* ``handler_errors`` — the [`HandlerErrors`][oxbus.testing.HandlerErrors] of that bus.
* ``event_registry`` — runs the test in its own view of the event registry
  ([`isolated`][oxbus.registry.isolated]): the event classes of the test module, and of the
  modules it imports from, win over same-named classes of other modules, and classes the test defines are forgotten after it,
  so event classes in tests need no unique names. Not automatic: make it so in a
  ``conftest.py`` with ``@pytest.fixture(autouse=True)`` ``def _registry(event_registry): ...``.

```python
async def test_a_receipt_follows_each_order(event_bus, event_recorder):
    event_bus.subscribe(OrderPlaced, send_receipt)
    order = OrderPlaced("o-1", 9.5)
    await event_bus.publish(order)
    receipt = await event_recorder.first(ReceiptSent)
    assert receipt.order_id == "o-1"
    await event_recorder.assert_handled(send_receipt, order)

async def test_a_bad_order_is_dead_lettered(event_bus, handler_errors):
    event_bus.subscribe(OrderPlaced, send_receipt)
    await event_bus.publish(OrderPlaced("o-2", -1.0))
    await event_bus.drain()
    (error,) = handler_errors.take()       # expected: the teardown does not fail
    assert isinstance(error.error, ValueError)
```

The fixtures are async; pytest-asyncio runs them (``asyncio_mode = "auto"`` or strict —
they are declared with ``pytest_asyncio.fixture`` when it is installed), for async tests
and for plain ``def`` tests alike.
"""

from __future__ import annotations

import sys
import types
from typing import Any, AsyncIterator, Callable, Iterator, TypeVar, cast

import pytest

from oxbus import registry
from oxbus.bus import EventBus
from oxbus.testing import EventRecorder, HandlerErrors, record_calls

__all__ = [
    "DRAIN_TIMEOUT", "event_bus", "event_bus_options", "event_recorder", "event_registry",
    "handler_errors",
]

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


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "oxbus(allow_errors=False): options of the event_bus fixture; allow_errors=True: "
        "handler calls that raise (or dead letters) do not fail the test",
    )


def _allow_errors(request: pytest.FixtureRequest) -> bool:
    marker = request.node.get_closest_marker("oxbus")
    if marker is None:
        return False
    unknown = set(marker.kwargs) - {"allow_errors"}
    if marker.args or unknown:
        raise pytest.UsageError(
            f"@pytest.mark.oxbus takes only allow_errors=..., got "
            f"{marker.args or ''}{sorted(unknown) if unknown else ''}"
        )
    return bool(marker.kwargs.get("allow_errors", False))


def _async_fixture(fn: F) -> F:
    try:
        import pytest_asyncio
    except ImportError:  # another plugin (anyio's, for instance) runs async fixtures
        return cast(F, pytest.fixture(fn))
    return cast(F, pytest_asyncio.fixture(fn))


@pytest.fixture
def event_bus_options() -> dict[str, Any]:
    """Keywords for the ``event_bus`` fixture's ``EventBus``; override it to configure:

    ```python
    @pytest.fixture
    def event_bus_options():
        return {"workers": 4, "max_queue_size": 100}
    ```
    """
    return {}


_errors: dict[int, HandlerErrors] = {}


@_async_fixture
async def event_bus(
    event_bus_options: dict[str, Any], pytestconfig: pytest.Config, request: pytest.FixtureRequest
) -> AsyncIterator[EventBus]:
    """A started ``EventBus``, drained and stopped after the test (a drain that times out
    is a teardown error naming what was still queued or running). A handler call that
    raised fails the test at teardown, unless taken (``handler_errors.take()``) or allowed
    (``@pytest.mark.oxbus(allow_errors=True)``)."""
    timeout = float(pytestconfig.getini("oxbus_drain_timeout"))
    allow = _allow_errors(request)
    options = dict(event_bus_options)
    cls = options.pop("cls", EventBus)
    bus: EventBus = cls(**options)
    record_calls(bus)
    errors = HandlerErrors(bus)
    _errors[id(bus)] = errors
    await bus.start()
    try:
        yield bus
        if bus.is_running:
            await bus.drain(timeout=timeout)
    finally:
        try:
            if bus.is_running:
                # Drained, or the drain failed: what still runs is cancelled at once.
                await bus.stop(timeout=0, drain=False)
        finally:
            errors.close()
            del _errors[id(bus)]
    report = None if allow else errors.report()
    if report is not None:
        pytest.fail(report, pytrace=False)


@pytest.fixture
def handler_errors(event_bus: EventBus) -> HandlerErrors:
    """The failed handler calls of the ``event_bus``: ``take()`` them to say the test
    expected them (then the teardown does not fail)."""
    return _errors[id(event_bus)]


@pytest.fixture
def event_recorder(event_bus: EventBus) -> Iterator[EventRecorder]:
    """Every event the ``event_bus`` accepts during the test, in order."""
    recorder = EventRecorder(event_bus)
    try:
        yield recorder
    finally:
        recorder.close()


@pytest.fixture
def event_registry(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test in its own view of the event registry
    ([`isolated`][oxbus.registry.isolated]): the event classes of the modules its module
    imports from, then of its module, registered on top (a helper module that writes events
    gets them read back as its own classes); what the test registers forgotten after it. Not
    automatic; in a `conftest.py`:

    ```python
    @pytest.fixture(autouse=True)
    def _registry(event_registry):
        pass
    ```
    """
    try:
        modules = _imported_from(request.module)
    except AttributeError:  # not collected from a module (a doctest, say)
        modules = []
    with registry.isolated(*modules):
        yield


def _imported_from(module: types.ModuleType) -> list[types.ModuleType]:
    """The modules ``module`` imports (or imports names from), then ``module`` itself."""
    found: dict[str, types.ModuleType] = {}
    for value in list(vars(module).values()):
        if isinstance(value, types.ModuleType):
            name: object = value.__name__
        else:
            try:
                name = getattr(value, "__module__", None) if callable(value) else None
            except Exception:  # noqa: BLE001, S112 - an object whose attributes raise: not a lead
                continue
        other = sys.modules.get(name) if isinstance(name, str) else None
        if other is not None and other is not module:
            found[other.__name__] = other
    return [*found.values(), module]
