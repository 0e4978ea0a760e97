"""Several buses in one Prometheus registry (issue 14): every sample has a ``bus`` label from
``EventBus(name=...)``, one collector reads several buses, ``oxbus.metrics.register`` keeps one
collector per registry, and two buses of one name are refused rather than mixed up."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import oxbus.metrics


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def published(got: dict[Any, float], bus: str, event_type: str) -> float:
    key = ("oxbus_events_published_total", frozenset({("bus", bus), ("event_type", event_type)}))
    return got[key]


async def test_two_buses_register_in_one_registry_and_are_told_apart(make_bus: Any) -> None:
    orders = await make_bus(name="orders")
    payments = await make_bus(name="payments")
    await orders.publish({"event_type": "placed"})
    await payments.publish({"event_type": "placed"})
    await payments.publish({"event_type": "placed"})
    await orders.drain()
    await payments.drain()

    registry = CollectorRegistry()
    first = oxbus.metrics.register(orders, registry)
    assert oxbus.metrics.register(payments, registry) is first  # one collector per registry
    assert oxbus.metrics.register(payments, registry) is first  # idempotent per bus
    got = samples(registry)
    assert published(got, "orders", "placed") == 1
    assert published(got, "payments", "placed") == 2
    up = {dict(labels)["bus"]: v for (name, labels), v in got.items() if name == "oxbus_up"}
    assert up == {"orders": 1.0, "payments": 1.0}
    counts = {
        dict(labels)["bus"]
        for (name, labels), _ in got.items()
        if name == "oxbus_handler_duration_seconds_count"
    }
    assert counts == {"orders", "payments"}

    both = CollectorRegistry()
    both.register(oxbus.metrics.BusCollector(orders, payments))
    assert samples(both).keys() == got.keys()  # the same samples (values move: uptime, memory)


async def test_two_buses_of_one_name_are_refused(make_bus: Any) -> None:
    a = await make_bus()
    b = await make_bus()
    with pytest.raises(ValueError, match="a bus named 'oxbus' is collected already"):
        oxbus.metrics.BusCollector(a, b)
    registry = CollectorRegistry()
    oxbus.metrics.register(a, registry)
    with pytest.raises(ValueError, match="EventBus\\(name=...\\)"):
        oxbus.metrics.register(b, registry)
