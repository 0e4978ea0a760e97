"""Saga definitions that cannot work fail at ``register_saga`` with ``InvalidSaga`` (a
``ConfigurationError``) naming the problem; misuse inside a step names the value."""

from __future__ import annotations

from typing import Any

import oxbus
import pytest
from _saga import SgOrderCreated, SgOrderSaga, SgPaymentFailed, SgPaymentProcessed, order
from oxbus import EventBus
from oxbus.errors import ConfigurationError, InvalidSaga


def _refused(cls: Any) -> str:
    bus = EventBus()
    with pytest.raises(InvalidSaga) as info:
        bus.register_saga(cls)
    assert isinstance(info.value, ConfigurationError)
    assert bus.subscriptions() == [], "nothing subscribed"
    return str(info.value)


def test_a_saga_without_a_key_is_refused() -> None:
    class SgNoKey(oxbus.Saga):
        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None: ...

    assert _refused(SgNoKey) == (
        'SgNoKey has no key: set key = "<field>", the event field whose value names the '
        "instance (got None)"
    )


def test_a_key_that_is_not_a_field_name_is_refused() -> None:
    class SgBadKey(oxbus.Saga):
        key = 42  # type: ignore[assignment]

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None: ...

    assert "(got 42)" in _refused(SgBadKey)


def test_an_event_type_taken_by_two_steps_is_refused() -> None:
    class SgTwice(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None: ...

        @oxbus.step(SgPaymentFailed)
        async def failed(self, e: Any) -> None: ...

        @oxbus.step(SgPaymentProcessed, SgPaymentFailed)
        async def settled(self, e: Any) -> None: ...

    assert _refused(SgTwice) == (
        "SgTwice: SgPaymentFailed is taken by two steps, failed and settled; an event type "
        "has one step"
    )


def test_a_saga_no_event_can_start_is_refused() -> None:
    class SgNoStart(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated)
        async def created(self, e: Any) -> None: ...

        @oxbus.step(SgPaymentFailed)
        async def failed(self, e: Any) -> None: ...

    assert _refused(SgNoStart) == (
        "SgNoStart has no step with starts=True: no event could start an instance "
        "(steps: created, failed)"
    )


def test_a_step_that_is_not_async_is_refused() -> None:
    class SgSync(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        def created(self, e: Any) -> None: ...

    assert _refused(SgSync) == (
        "SgSync.created is a step but not an async def method: write "
        "`async def created(self, event)`"
    )


def test_a_saga_without_steps_a_step_without_types_and_a_pattern_are_refused() -> None:
    class SgEmpty(oxbus.Saga):
        key = "order_id"

    assert "has no steps" in _refused(SgEmpty)

    class SgNoTypes(oxbus.Saga):
        key = "order_id"

        @oxbus.step(starts=True)
        async def created(self, e: Any) -> None: ...

    assert _refused(SgNoTypes) == "SgNoTypes.created: @oxbus.step needs at least one event type"

    class SgPattern(oxbus.Saga):
        key = "order_id"

        @oxbus.step("order.*", starts=True)
        async def created(self, e: Any) -> None: ...

    assert "not the pattern 'order.*'" in _refused(SgPattern)


def test_only_saga_classes_and_one_saga_per_name_are_registered() -> None:
    assert _refused(SgOrderCreated) == (
        f"register_saga takes a subclass of oxbus.Saga, got {SgOrderCreated!r}"
    )
    assert "subclass of oxbus.Saga" in _refused(oxbus.Saga)
    bus = EventBus()
    assert bus.register_saga(SgOrderSaga) is SgOrderSaga
    n = len(bus.subscriptions())
    with pytest.raises(
        InvalidSaga, match="a saga named 'SgOrderSaga' is registered on this bus already"
    ):
        bus.register_saga(SgOrderSaga)
    assert len(bus.subscriptions()) == n


def test_a_retry_that_is_not_a_policy_is_refused() -> None:
    class SgRetry(oxbus.Saga):
        key = "order_id"
        retry = 3  # type: ignore[assignment]

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None: ...

    assert _refused(SgRetry) == "SgRetry.retry must be a RetryPolicy, got 3"


async def test_a_bad_deadline_inside_a_step_fails_the_step_naming_the_value() -> None:
    class SgBadDeadline(oxbus.Saga):
        key = "order_id"

        @oxbus.step(SgOrderCreated, starts=True)
        async def created(self, e: Any) -> None:
            self.deadline(-5, SgPaymentFailed(e.order_id))

    bus = EventBus()
    bus.register_saga(SgBadDeadline)
    async with bus:
        await bus.publish(order("o-1"))
        await bus.drain(timeout=10)
        [dead] = bus.dead_letters.list()
        assert dead.error_message == "deadline seconds must be a number >= 0, got -5"
        assert (await bus.sagas.instances(SgBadDeadline))[0].status == "failed"


async def test_listing_an_unknown_saga_or_state_names_it() -> None:
    bus = EventBus()
    bus.register_saga(SgOrderSaga)
    with pytest.raises(ConfigurationError, match="no saga 'Nope' is registered on this bus"):
        await bus.sagas.instances("Nope")
    with pytest.raises(ConfigurationError, match="state must be one of running, completed"):
        await bus.sagas.instances(state="paused")
