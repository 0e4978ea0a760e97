"""The pytest plugin, as a user meets it: installed with oxbus (the ``pytest11`` entry point),
no import or ``pytest_plugins`` line needed, fixtures ``event_bus`` and ``event_recorder``.
Each test here runs a complete test file in a pytest of its own (``pytester``)."""

from __future__ import annotations

import asyncio
import enum
import re
from pathlib import Path
from typing import Any

import pytest

from oxbus.testing import EventRecorder, assert_published

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
filterwarnings = error
{extra}
"""

EXAMPLE = '''
from dataclasses import dataclass

import pytest

from oxbus import DomainEvent
from oxbus.testing import assert_not_published, assert_published


@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    order_id: str
    amount: float

    @property
    def aggregate_id(self) -> str:
        return self.order_id


@dataclass(frozen=True)
class ReceiptSent(DomainEvent):
    order_id: str


@dataclass(frozen=True)
class RefundIssued(DomainEvent):
    order_id: str


@pytest.fixture
def event_bus_options():
    return {"workers": 2}


@pytest.fixture(autouse=True)
def receipts(event_bus):
    async def send_receipt(event: OrderPlaced) -> None:
        if event.amount > 0:
            await event_bus.publish(ReceiptSent(event.order_id))

    event_bus.subscribe(OrderPlaced, send_receipt)


async def test_a_receipt_follows_each_order(event_bus, event_recorder):
    await event_bus.publish(OrderPlaced("o-1", 9.5))
    receipt = await event_recorder.first(ReceiptSent)
    assert receipt.order_id == "o-1"
    assert [e.order_id for e in event_recorder.of_type(OrderPlaced)] == ["o-1"]
    assert event_recorder.types() == ["OrderPlaced", "ReceiptSent"]


async def test_assertion_helpers_wait_on_the_bus(event_bus, event_recorder):
    await event_bus.publish(OrderPlaced("o-2", 1.0))
    await event_bus.publish(OrderPlaced("o-3", 0.0))
    await assert_published(event_bus, ReceiptSent, lambda e: e.order_id == "o-2")
    await assert_not_published(event_recorder, ReceiptSent, lambda e: e.order_id == "o-3")
    await assert_not_published(event_recorder, RefundIssued)
    with pytest.raises(AssertionError, match="no RefundIssued event within 0.05s"):
        await assert_published(event_recorder, RefundIssued, timeout=0.05)


async def test_clear_forgets_what_was_recorded(event_bus, event_recorder):
    await event_bus.publish(OrderPlaced("o-4", 2.0))
    await event_bus.drain()
    assert len(event_recorder.events) == 2
    event_recorder.clear()
    assert event_recorder.events == []
    await event_bus.publish(OrderPlaced("o-5", 0.0))
    assert [e.order_id for e in event_recorder.events] == ["o-5"]


async def test_options_configure_the_bus(event_bus):
    assert event_bus.is_running
    assert event_bus.get_statistics()["worker_count"] == 2


def test_a_plain_test_gets_a_started_bus_too(event_bus, event_recorder):
    assert event_bus.is_running
    assert event_recorder.events == []


BUSES = []


async def test_first_half(event_bus):
    BUSES.append(event_bus)
    await event_bus.publish(OrderPlaced("o-6", 3.0))  # not drained by the test itself


def test_second_half_sees_the_first_bus_drained_and_stopped():
    (bus,) = BUSES
    assert not bus.is_running
    stats = bus.get_statistics()
    assert stats["events_published"] == stats["events_processed"] == 2
'''


def write_ini(pytester: pytest.Pytester, mode: str = "auto", extra: str = "") -> None:
    pytester.makefile(".ini", pytest=INI.format(mode=mode, extra=extra))


def test_a_complete_example_test_file_passes(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    pytester.makepyfile(test_orders=EXAMPLE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=7)


def test_the_fixtures_also_work_in_strict_mode(pytester: pytest.Pytester) -> None:
    write_ini(pytester, mode="strict")
    pytester.makepyfile(
        test_strict='''
        import pytest

        @pytest.mark.asyncio
        async def test_publish_and_record(event_bus, event_recorder):
            await event_bus.publish({"event_type": "ping"})
            assert await event_recorder.first("ping") == {"event_type": "ping"}
        '''
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_handler_that_never_finishes_is_a_teardown_error(pytester: pytest.Pytester) -> None:
    write_ini(pytester, extra="oxbus_drain_timeout = 0.2")
    pytester.makepyfile(
        test_stuck='''
        import asyncio

        async def test_stuck(event_bus):
            async def forever(event):
                await asyncio.Event().wait()

            event_bus.subscribe("stuck", forever)
            await event_bus.publish({"event_type": "stuck"})
        '''
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*drain timed out after 0.2s*1 in handlers*"])


def test_the_plugin_is_registered_through_the_entry_point(pytester: pytest.Pytester) -> None:
    write_ini(pytester)
    pytester.makepyfile(test_nothing="def test_nothing(): pass")
    result = pytester.runpytest("-p", "no:cacheprovider", "--fixtures")
    for fixture in (
        "event_bus_options", "event_bus", "event_recorder", "handler_errors", "event_registry"
    ):
        result.stdout.fnmatch_lines([f"{fixture} -- *"])  # in whatever order pytest lists them
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:oxbus", "--fixtures")
    assert "event_recorder" not in result.stdout.str()


def test_the_readme_example_test_file_passes(pytester: pytest.Pytester) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(# test_orders\.py.*?)```", readme, re.S)
    assert block is not None, "README: the pytest example is gone"
    write_ini(pytester)
    pytester.makepyfile(test_orders=block.group(1))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


REGISTRY_MODULE = """
from dataclasses import dataclass

from oxbus import DomainEvent, SqliteEventStore
from oxbus.registry import lookup


@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    {field}: str


async def test_stored_events_come_back_as_this_module_s_class(tmp_path):
    assert lookup("OrderPlaced") is OrderPlaced
    with SqliteEventStore(str(tmp_path / "e.db")) as store:
        await store.append("s", [OrderPlaced("x")])
        (row,) = await store.read("s")
    assert type(row.event) is OrderPlaced and row.event.{field} == "x"


def test_a_class_defined_in_a_test_is_forgotten_after_it_{n}():
    assert lookup("DefinedInATest") is None
    class DefinedInATest(DomainEvent):
        pass
    assert lookup("DefinedInATest") is DefinedInATest
"""


HELPER_MODULE = """
from oxbus import DomainEvent


class Shipped(DomainEvent):
    def __init__(self, parcel):
        super().__init__()
        self.parcel = parcel


def shipped(parcel):
    return Shipped(parcel)
"""

USES_HELPER = """
from oxbus import SqliteEventStore
from parcels import shipped


async def test_a_helper_module_s_events_come_back_as_its_classes(tmp_path):
    with SqliteEventStore(str(tmp_path / "e.db")) as store:
        await store.append("s", [shipped("p-1")])
        (row,) = await store.read("s")
    assert type(row.event).__module__ == "parcels" and row.event.parcel == "p-1"
"""


@pytest.mark.parametrize("isolated", [True, False])
def test_event_registry_lets_test_modules_reuse_event_class_names(
    pytester: pytest.Pytester, isolated: bool
) -> None:
    write_ini(pytester)
    if isolated:
        pytester.makeconftest(
            "import pytest\n\n"
            "@pytest.fixture(autouse=True)\n"
            "def _registry(event_registry):\n"
            "    pass\n"
        )
    pytester.makepyfile(
        test_billing=REGISTRY_MODULE.format(field="invoice", n=1),
        test_shipping=REGISTRY_MODULE.format(field="parcel", n=2),
    )
    if isolated:
        # A helper module writes the events a test reads back; the test imports a function
        # only, and a module collected later has a class of the same name.
        pytester.makepyfile(
            parcels=HELPER_MODULE,
            test_uses_a_helper=USES_HELPER,
            test_zz_later="from oxbus import DomainEvent\n\n"
            "class Shipped(DomainEvent):\n    pass\n\n"
            "def test_nothing():\n    pass\n",
        )
    result = pytester.runpytest("-p", "no:cacheprovider")
    if isolated:
        result.assert_outcomes(passed=6)
    else:  # the last module imported owns "OrderPlaced"; a test's class outlives it
        result.assert_outcomes(passed=2, failed=2)


# ---------------------------------------------------- the recorder itself, without pytester


class Base:
    pass


class Child(Base):
    pass


class Kind(enum.Enum):
    SHIPPED = "order.shipped"


async def test_the_recorder_matches_like_the_bus_and_changes_nothing(make_bus: Any) -> None:
    bus = await make_bus()
    with EventRecorder(bus) as rec:
        await bus.publish(Child())
        await bus.publish({"event_type": "order.shipped"})
        await bus.publish({"event_type": "order.item.added"})
        assert len(rec) == 3  # recorded on acceptance, before any handler
        assert [type(e) for e in rec.of_type(Base)] == [Child]
        assert len(rec.of_type("order.*")) == 1
        assert len(rec.of_type("order.#")) == 2
        assert rec.of_type(Kind.SHIPPED) == [{"event_type": "order.shipped"}]
        assert rec.of_type("Child") == rec.of_type(Child)
        stats = bus.get_statistics()
        assert stats["subscription_count"] == 0 and stats["events_unrouted"] == 3
        with pytest.raises(TimeoutError, match="no order.shipped event matching the predicate"):
            await rec.wait_for("order.shipped", lambda e: False, timeout=0.01)
        with pytest.raises(ZeroDivisionError):
            waiting = asyncio.ensure_future(rec.wait_for("late", lambda e: 1 / 0))
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
            await bus.publish({"event_type": "late"})
            await waiting
    await bus.publish(Child())
    assert len(rec) == 4  # closed: no longer recording


async def test_assert_published_on_a_bare_bus_waits_for_the_next_event(make_bus: Any) -> None:
    bus = await make_bus()

    async def later() -> None:
        await bus.publish({"event_type": "done"})

    task = asyncio.ensure_future(later())
    assert await assert_published(bus, "done") == {"event_type": "done"}
    await task
    with pytest.raises(AssertionError, match="no done event within 0.01s"):
        await assert_published(bus, "done", timeout=0.01)
