"""The pytest plugin as faststream's TestBroker users expect it (issue 14): a handler that
raises fails the test (unless the test expected it), handler calls can be asserted, and
``bus.wait_for`` / ``event_recorder.wait_for`` mean the same thing. Also ``subscribe()``
refusing a handler that cannot take the event. Each plugin test runs a test file in a pytest
of its own (``pytester``)."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from oxbus import EventBus
from oxbus.errors import InvalidSubscription

pytest_plugins = ["pytester"]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

HEADER = '''
from dataclasses import dataclass

import pytest

from oxbus import DomainEvent, RetryPolicy
from oxbus.testing import assert_handled


@dataclass(frozen=True)
class OrderPlaced(DomainEvent):
    order_id: str
    amount: float


@dataclass(frozen=True)
class ReceiptSent(DomainEvent):
    order_id: str


class PaymentRefused(Exception):
    pass


async def charge(event: OrderPlaced) -> None:
    if event.amount < 0:
        raise PaymentRefused(f"negative amount {event.amount}")
'''


def run(pytester: pytest.Pytester, body: str) -> pytest.RunResult:
    pytester.makefile(".ini", pytest=INI)
    pytester.makepyfile(test_it=HEADER + body)
    return pytester.runpytest("-p", "no:cacheprovider")


def test_a_handler_that_raises_fails_the_test_at_teardown_with_its_traceback(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
async def test_ignores_the_failure(event_bus):
    event_bus.subscribe(OrderPlaced, charge)
    await event_bus.publish(OrderPlaced("o-1", -5.0))
""",
    )
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "1 handler call(s) failed during the test" in out
    assert "PaymentRefused: negative amount -5.0" in out
    assert "in charge" in out and 'raise PaymentRefused(f"negative amount' in out  # traceback
    assert "allow_errors=True" in out and "handler_errors.take()" in out


def test_a_failure_that_was_retried_away_still_fails_the_test(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
@pytest.fixture
def event_bus_options():
    return {"retry": RetryPolicy(max_attempts=2, base_delay=0.001)}


async def test_flaky(event_bus):
    calls = []

    async def flaky(event):
        calls.append(event)
        if len(calls) == 1:
            raise ConnectionError("first call fails")

    event_bus.subscribe(OrderPlaced, flaky)
    await event_bus.publish(OrderPlaced("o-1", 1.0))
    await event_bus.drain()
    assert len(event_bus.dead_letters) == 0
""",
    )
    result.assert_outcomes(passed=1, errors=1)
    assert "ConnectionError: first call fails" in result.stdout.str()


def test_the_marker_or_taking_the_errors_says_they_were_expected(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
@pytest.mark.oxbus(allow_errors=True)
async def test_marked(event_bus):
    event_bus.subscribe(OrderPlaced, charge)
    await event_bus.publish(OrderPlaced("o-1", -5.0))
    await event_bus.drain()
    (dead,) = event_bus.dead_letters.list()
    assert dead.error_type.endswith("PaymentRefused")


async def test_taken(event_bus, handler_errors):
    event_bus.subscribe(OrderPlaced, charge)
    await event_bus.publish(OrderPlaced("o-2", -1.0))
    await event_bus.drain()
    (error,) = handler_errors.take()
    assert isinstance(error.error, PaymentRefused)
    assert (error.subscription, error.event_type, error.attempt, error.final) == (
        "test_it.charge", "OrderPlaced", 1, True)
    assert handler_errors.take() == []


async def test_taken_then_another_failure(event_bus, handler_errors):
    event_bus.subscribe(OrderPlaced, charge)
    await event_bus.publish(OrderPlaced("o-3", -1.0))
    await event_bus.drain()
    handler_errors.take()
    await event_bus.publish(OrderPlaced("o-4", -2.0))


def test_the_marker_is_registered(pytestconfig):
    assert any(m.startswith("oxbus(") for m in pytestconfig.getini("markers"))
""",
    )
    result.assert_outcomes(passed=4, errors=1)
    out = result.stdout.str()
    report = out.split("ERROR at teardown of test_taken_then_another_failure")[1]
    report = report.split("Captured log")[0]  # the report only, not the log
    assert "1 handler call(s) failed" in report
    assert "negative amount -2.0" in report and "negative amount -1.0" not in report


def test_handler_calls_are_recorded_and_asserted(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
async def test_calls(event_bus, event_recorder):
    seen = []

    def audit(event: OrderPlaced) -> None:  # a thread-pool handler
        seen.append(event)

    event_bus.subscribe(OrderPlaced, charge)
    event_bus.subscribe(OrderPlaced, audit)
    first, second = OrderPlaced("o-1", 1.0), OrderPlaced("o-2", 2.0)
    await event_bus.publish(first)
    await event_bus.publish(second)
    await event_recorder.assert_handled(charge, first)
    await assert_handled(event_bus, audit, OrderPlaced("o-2", 2.0))  # an equal event
    assert event_recorder.calls(charge) == [first, second]
    assert event_recorder.calls(audit) == seen == [first, second]
    names = [s["name"] for s in event_bus.subscriptions()]
    assert names == ["test_it.charge", "test_it.test_calls.<locals>.audit"]
    with pytest.raises(AssertionError, match="did not handle .*o-3.*its calls"):
        await assert_handled(event_bus, charge, OrderPlaced("o-3", 3.0))
    assert event_bus.unsubscribe(OrderPlaced, audit)
    assert [s["name"] for s in event_bus.subscriptions()] == ["test_it.charge"]


@pytest.mark.oxbus(allow_errors=True)
async def test_a_call_that_raised_is_not_handled(event_bus, event_recorder):
    event_bus.subscribe(OrderPlaced, charge)
    bad = OrderPlaced("o-9", -1.0)
    await event_bus.publish(bad)
    with pytest.raises(AssertionError, match="raised PaymentRefused"):
        await event_recorder.assert_handled(charge, bad)
    assert event_recorder.calls(charge) == [bad]
""",
    )
    result.assert_outcomes(passed=2)


def test_bus_and_recorder_wait_for_mean_the_same_and_first_sees_the_past(
    pytester: pytest.Pytester,
) -> None:
    result = run(
        pytester,
        """
async def test_wait_for(event_bus, event_recorder):
    await event_bus.publish(ReceiptSent("before"))
    from_bus = event_bus.wait_for(ReceiptSent)
    from_recorder = event_recorder.wait_for(ReceiptSent)  # both listen from the call on
    await event_bus.publish(ReceiptSent("after"))
    assert (await from_bus).order_id == (await from_recorder).order_id == "after"
    assert (await event_recorder.first(ReceiptSent)).order_id == "before"
    with pytest.raises(TimeoutError, match="1 matching event.s. recorded before the call"):
        await event_recorder.wait_for(ReceiptSent, lambda e: e.order_id == "before", 0.01)
""",
    )
    result.assert_outcomes(passed=1)


# ------------------------------------------------------------------ subscribe's check


async def _one(event: Any) -> None: ...


async def _two(event: Any, extra: Any) -> None: ...


def _none() -> None: ...


def _keyword_only(*, event: Any) -> None: ...


class _Handler:
    def method(self, event: Any) -> None: ...

    def __call__(self, event: Any, *more: Any) -> None: ...


@pytest.mark.parametrize(
    "handler",
    [_one, _Handler().method, _Handler(), functools.partial(_two, extra=1), print],
    ids=["function", "bound method", "callable object", "partial", "builtin"],
)
def test_subscribe_takes_a_handler_callable_with_the_event(handler: Any) -> None:
    EventBus().subscribe("x", handler)


@pytest.mark.parametrize(
    ("handler", "shown"),
    [
        (_two, "_two(event: 'Any', extra: 'Any')"),
        (_none, "_none()"),
        (_keyword_only, "_keyword_only(*, event: 'Any')"),
        (_Handler.method, "_Handler.method(self, event: 'Any')"),
    ],
    ids=["two required", "none", "keyword-only", "unbound method"],
)
def test_subscribe_refuses_a_handler_that_cannot_take_the_event(handler: Any, shown: str) -> None:
    with pytest.raises(InvalidSubscription, match="cannot be called with the event") as e:
        EventBus().subscribe("x", handler)
    assert shown in str(e.value)
