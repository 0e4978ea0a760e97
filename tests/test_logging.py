"""Logging integration: ``oxbus.CorrelationFilter`` puts the handled event's ids on every record
(the user's too), ``"-"`` outside handlers; the bus's own records carry them anyway."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterator

import pytest

import oxbus
from oxbus import CorrelationFilter, DomainEvent, EventBus

log = logging.getLogger("test_logging.app")


class OrderPlaced(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id


class ReceiptSent(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)  # a format that names the fields must not fail
        self.records.append(record)

    def by_message(self, text: str) -> logging.LogRecord:
        (record,) = [r for r in self.records if text in r.getMessage()]
        return record


@pytest.fixture
def captured() -> Iterator[ListHandler]:
    handler = ListHandler()
    handler.addFilter(CorrelationFilter())
    handler.setFormatter(
        logging.Formatter("%(correlation_id)s %(event_id)s %(causation_id)s %(message)s")
    )
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_records_logged_in_handlers_carry_the_envelope_ids(
    make_bus: Any, captured: ListHandler
) -> None:
    bus = await make_bus()
    order = OrderPlaced("o-1")

    async def place(event: OrderPlaced) -> None:
        log.info("placing %s", event.order_id)
        await bus.publish(ReceiptSent(event.order_id))

    async def receipt(event: ReceiptSent) -> None:
        log.info("receipt for %s", event.order_id)

    bus.subscribe(OrderPlaced, place)
    bus.subscribe(ReceiptSent, receipt)
    log.info("before publishing")
    await bus.publish(order)
    await bus.drain()

    outside = captured.by_message("before publishing")
    assert (outside.correlation_id, outside.event_id, outside.causation_id) == ("-", "-", "-")  # type: ignore[attr-defined]

    placing = captured.by_message("placing o-1")
    assert placing.event_id == order.event_id  # type: ignore[attr-defined]
    assert placing.correlation_id == order.correlation_id  # type: ignore[attr-defined]
    assert placing.causation_id == "-"  # type: ignore[attr-defined]  # a root event
    assert placing.event_type == "OrderPlaced"  # type: ignore[attr-defined]

    child = captured.by_message("receipt for o-1")
    assert child.correlation_id == order.correlation_id  # type: ignore[attr-defined]
    assert child.causation_id == order.event_id  # type: ignore[attr-defined]
    assert child.event_id not in ("-", order.event_id)  # type: ignore[attr-defined]
    assert captured.format(child).startswith(f"{order.correlation_id} {child.event_id} ")  # type: ignore[attr-defined]


async def test_tasks_and_thread_pool_handlers_keep_the_ids(
    make_bus: Any, captured: ListHandler
) -> None:
    bus = await make_bus(sync_handlers="thread")
    order = OrderPlaced("o-2")

    def sync_handler(event: OrderPlaced) -> None:
        log.info("from a pool thread")

    async def spawner(event: OrderPlaced) -> None:
        async def later() -> None:
            log.info("from a task")

        await asyncio.create_task(later())

    bus.subscribe(OrderPlaced, sync_handler)
    bus.subscribe(OrderPlaced, spawner)
    await bus.publish(order)
    await bus.drain()
    for text in ("from a pool thread", "from a task"):
        record = captured.by_message(text)
        assert record.event_id == order.event_id, text  # type: ignore[attr-defined]
        assert record.correlation_id == order.correlation_id, text  # type: ignore[attr-defined]


async def test_the_bus_failure_record_carries_the_ids_without_any_filter(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # caplog's handler has no CorrelationFilter: the fields come from the bus's logger.
    caplog.set_level(logging.ERROR, logger="oxbus")
    bus = await make_bus()
    order = OrderPlaced("o-3")

    async def broken(event: OrderPlaced) -> None:
        raise ValueError("boom")

    bus.subscribe(OrderPlaced, broken)
    await bus.publish(order)
    await bus.drain()
    (record,) = [r for r in caplog.records if r.name == "oxbus"]
    assert record.correlation_id == order.correlation_id  # type: ignore[attr-defined]
    assert record.event_id == order.event_id  # type: ignore[attr-defined]
    assert record.causation_id == "-"  # type: ignore[attr-defined]
    assert record.event_type == "OrderPlaced"  # type: ignore[attr-defined]


async def test_bus_records_outside_handlers_carry_dashes(
    make_bus: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="oxbus")
    bus = await make_bus()
    release = asyncio.Event()

    async def stuck(event: OrderPlaced) -> None:
        await release.wait()

    bus.subscribe(OrderPlaced, stuck)
    await bus.publish(OrderPlaced("o-4"))
    await bus.publish(OrderPlaced("o-5"))
    await bus.stop(drain=False)  # logs the discarded event, from outside any handler
    release.set()
    records = [r for r in caplog.records if r.name == "oxbus"]
    assert records
    for r in records:
        assert (r.correlation_id, r.event_id, r.causation_id) == ("-", "-", "-")  # type: ignore[attr-defined]


def test_values_given_with_extra_are_kept_and_default_is_configurable() -> None:
    f = CorrelationFilter(default="")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.correlation_id = "given"
    assert f.filter(record) is True
    assert record.correlation_id == "given"
    assert (record.event_id, record.causation_id, record.event_type) == ("", "", "")  # type: ignore[attr-defined]
    assert oxbus.log.FIELDS == (
        "correlation_id", "event_id", "causation_id", "event_type", "subscription", "attempt"
    )


async def test_the_life_cycle_is_logged_at_info_and_failures_name_subscription_and_attempt(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="oxbus")
    db = str(tmp_path / "life.db")
    bus = EventBus(
        store=db, name="orders", retry=oxbus.RetryPolicy(max_attempts=2, base_delay=0.001)
    )

    def fails(event: Any) -> None:
        raise ValueError("boom")

    bus.subscribe("life.cycle", fails, name="life.fails")
    async with bus:
        await bus.publish({"event_type": "life.cycle"})
        await bus.drain()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [(r.__dict__["subscription"], r.__dict__["attempt"]) for r in failures] == [
        ("life.fails", 1),
        ("life.fails", 2),
    ]
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(m.startswith("bus 'orders' started: 1 worker(s), transport Sqlite(") for m in info)
    assert any(m.startswith("durable recovery: 0 undelivered") for m in info)
    assert "bus 'orders' stopped: 0 event(s) discarded or interrupted" in info
