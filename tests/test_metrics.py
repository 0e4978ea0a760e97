"""``bus.metrics()`` is Prometheus text that Prometheus's own parser reads back with the bus's
numbers, and ``oxbus.metrics.serve`` exposes it (and the health report) over HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import oxbus.metrics
from oxbus import DomainEvent, RetryPolicy
from oxbus.testing import ManualClock


class OrderPlaced(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id


class PaymentFailed(DomainEvent):
    pass


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and (sample name, labels) -> value, by prometheus_client's parser."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    labels.setdefault("bus", "oxbus")  # EventBus(name=...)'s default
    return samples[(name, frozenset(labels.items()))]


@pytest.fixture(autouse=True)
def quiet_oxbus_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.CRITICAL + 1, logger="oxbus")


async def test_metrics_after_known_traffic_parse_back_to_the_bus_numbers(make_bus: Any) -> None:
    clock = ManualClock()
    bus = await make_bus(
        workers=2, clock=clock, retry=RetryPolicy(max_attempts=2, base_delay=1.0, jitter=0)
    )

    async def ship(event: OrderPlaced) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus

    async def charge(event: PaymentFailed) -> None:
        raise ConnectionError("gateway down")

    def audit(event: object) -> None:
        pass

    bus.subscribe(OrderPlaced, ship, name="shipping")
    bus.subscribe(PaymentFailed, charge, name="billing")
    bus.subscribe(PaymentFailed, audit, name="audit")
    for i in range(3):
        await bus.publish(OrderPlaced(f"o-{i}"))
    for _ in range(2):
        await bus.publish(PaymentFailed())
    await bus.publish({"event_type": "nobody.listens"})
    await clock.drain(bus)

    types, samples = parse(bus.metrics())

    assert bus.get_statistics()["by_subscription"] == {
        "shipping": {"calls": 3, "failed": 0, "retried": 0, "dead_lettered": 0},
        "billing": {"calls": 4, "failed": 4, "retried": 2, "dead_lettered": 2},
        "audit": {"calls": 2, "failed": 0, "retried": 0, "dead_lettered": 0},
    }
    assert types["oxbus_events_published"] == "counter"
    assert value(samples, "oxbus_events_published_total", event_type="OrderPlaced") == 3
    assert value(samples, "oxbus_events_published_total", event_type="PaymentFailed") == 2
    assert value(samples, "oxbus_events_processed_total", event_type="OrderPlaced") == 3
    assert value(samples, "oxbus_events_processed_total", event_type="PaymentFailed") == 2
    # Failures by (event type, subscription): two events x two attempts each for billing; a
    # series at 0 for every other pair an event was routed to.
    failures = {
        (labels["event_type"], labels["subscription"]): v
        for (name, fs), v in samples.items()
        if name == "oxbus_handler_failures_total"
        for labels in [dict(fs)]
    }
    assert failures == {
        ("PaymentFailed", "billing"): 4,
        ("PaymentFailed", "audit"): 0,
        ("OrderPlaced", "shipping"): 0,
    }
    for name, want in (
        ("oxbus_handler_calls_total", {"shipping": 3, "billing": 4, "audit": 2}),
        ("oxbus_retries_total", {"shipping": 0, "billing": 2, "audit": 0}),
        ("oxbus_dead_lettered_total", {"shipping": 0, "billing": 2, "audit": 0}),
    ):
        got = {dict(fs)["subscription"]: v for (n, fs), v in samples.items() if n == name}
        assert got == want, name
    assert value(samples, "oxbus_events_unrouted_total") == 1
    assert types["oxbus_dead_letters"] == "gauge"
    assert value(samples, "oxbus_dead_letters") == 2
    assert value(samples, "oxbus_queue_depth") == 0
    assert value(samples, "oxbus_in_flight") == 0
    assert value(samples, "oxbus_workers") == 2
    assert value(samples, "oxbus_subscriptions") == 3
    assert value(samples, "oxbus_up") == 1
    # The process's own numbers come from prometheus_client's ProcessCollector, unlabelled.
    assert samples[("process_resident_memory_bytes", frozenset())] > 1_000_000
    assert samples[("process_cpu_seconds_total", frozenset())] > 0
    assert not any(name.startswith("oxbus_process_") for name, _ in samples)
    # CPU only as that counter: no share over a window that depends on who asked last.
    assert [name for name, _ in samples if "cpu" in name] == ["process_cpu_seconds_total"]
    assert value(samples, "oxbus_system_memory_total_bytes") >= value(
        samples, "oxbus_system_memory_available_bytes"
    )

    assert types["oxbus_handler_duration_seconds"] == "histogram"
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "oxbus_handler_duration_seconds_bucket"
    )
    assert [le for le, _ in buckets][: len(oxbus.metrics.DEFAULT_BUCKETS)] == list(
        oxbus.metrics.DEFAULT_BUCKETS
    )
    assert buckets[-1][0] == float("inf")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    count = value(samples, "oxbus_handler_duration_seconds_count")
    assert counts[-1] == count
    # every call: 3 shipments + 4 charge attempts + 2 audits
    assert count == 9
    assert value(samples, "oxbus_handler_duration_seconds_sum") >= 0


@pytest.mark.parametrize("kind", ["sync", "async", "async, suspending"])
async def test_the_duration_histogram_counts_every_handler_call(make_bus: Any, kind: str) -> None:
    # Calls that finish without suspending were once timed 1 in 8: after 4 calls the count
    # was 0. Read the way a Prometheus server reads it: collector -> registry -> text -> parser.
    bus = await make_bus(workers=2)

    def sync_handler(event: OrderPlaced) -> None:
        pass

    async def async_handler(event: OrderPlaced) -> None:
        pass

    async def suspending_handler(event: OrderPlaced) -> None:
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus

    handler = {"sync": sync_handler, "async": async_handler}.get(kind, suspending_handler)
    bus.subscribe(OrderPlaced, handler)
    registry = CollectorRegistry()
    registry.register(oxbus.metrics.BusCollector(bus))
    for n in (1, 4, 37):
        for i in range(n):
            await bus.publish(OrderPlaced(f"o-{i % 3}"))
        await bus.drain()
        calls = bus.get_statistics()["handler_calls"]
        _, samples = parse(generate_latest(registry).decode())
        assert value(samples, "oxbus_handler_duration_seconds_count") == calls
        assert value(samples, "oxbus_handler_duration_seconds_bucket", le="+Inf") == calls
    assert calls == 1 + 4 + 37


async def test_queue_depth_and_in_flight_show_a_busy_bus(make_bus: Any) -> None:
    bus = await make_bus(workers=1)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(event: OrderPlaced) -> None:
        started.set()
        await release.wait()

    bus.subscribe(OrderPlaced, slow)
    for i in range(5):
        await bus.publish(OrderPlaced(f"o-{i}"))
    await asyncio.wait_for(started.wait(), 5)

    _, samples = parse(bus.metrics())
    assert value(samples, "oxbus_in_flight") == 1
    assert value(samples, "oxbus_queue_depth") == 4
    release.set()
    await bus.drain(timeout=5)
    _, samples = parse(bus.metrics())
    assert value(samples, "oxbus_queue_depth") == 0
    assert value(samples, "oxbus_events_processed_total", event_type="OrderPlaced") == 5


async def test_a_stopped_bus_reports_down_and_a_new_one_reports_zeros() -> None:
    bus = oxbus.EventBus()
    _, samples = parse(bus.metrics())  # never started: still valid text
    assert value(samples, "oxbus_up") == 0
    assert value(samples, "oxbus_healthy") == 0
    assert value(samples, "oxbus_handler_duration_seconds_count") == 0
    assert not any(name == "oxbus_events_published_total" for name, _ in samples)
    async with bus:
        _, samples = parse(bus.metrics())
        assert value(samples, "oxbus_up") == 1
        assert value(samples, "oxbus_healthy") == 1
    _, samples = parse(bus.metrics())
    assert value(samples, "oxbus_up") == 0


async def test_awkward_event_types_are_escaped_and_read_back(make_bus: Any) -> None:
    bus = await make_bus()
    weird = 'quote " back \\ slash\nnewline'
    await bus.publish({"event_type": weird})
    await bus.drain()
    _, samples = parse(bus.metrics())
    assert value(samples, "oxbus_events_published_total", event_type=weird) == 1


async def test_a_registry_with_its_own_process_collector_gets_no_second_copy(
    make_bus: Any,
) -> None:
    # prometheus_client.REGISTRY has a ProcessCollector already: registering a bus there must
    # neither clash with it (DuplicateTimeseries) nor repeat its numbers under other names.
    bus = await make_bus()
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    oxbus.metrics.register(bus, registry)
    _, samples = parse(generate_latest(registry).decode())  # parse() refuses duplicates
    process = {name for name, _ in samples if name.startswith("process_")}
    assert "process_cpu_seconds_total" in process and "process_resident_memory_bytes" in process
    ours = {name for name, _ in samples if name.startswith("oxbus_")}
    assert not any("cpu" in name or "resident" in name for name in ours), ours


async def test_custom_buckets_and_a_collector_beside_application_metrics(make_bus: Any) -> None:
    bus = await make_bus()
    _, samples = parse(oxbus.metrics.render(bus, buckets=[0.5, 0.01]))
    les = {dict(labels)["le"] for (n, labels) in samples if n.endswith("_bucket")}
    assert les == {"0.01", "0.5", "+Inf"}

    registry = CollectorRegistry()
    Counter("app_orders", "Orders taken.", registry=registry).inc(3)
    registry.register(oxbus.metrics.BusCollector(bus))
    _, samples = parse(generate_latest(registry).decode())
    assert samples[("app_orders_total", frozenset())] == 3  # the application's own: no bus label
    assert value(samples, "oxbus_up") == 1

    with pytest.raises(ValueError, match="buckets"):
        oxbus.metrics.BusCollector(bus, buckets=[0.0])


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


async def test_the_endpoint_serves_metrics_and_health_without_blocking_the_loop(
    make_bus: Any,
) -> None:
    bus = await make_bus(workers=2)

    async def handle(event: OrderPlaced) -> None:
        pass

    bus.subscribe(OrderPlaced, handle)
    await bus.publish(OrderPlaced("o-1"))
    await bus.drain()

    server = await oxbus.metrics.serve(bus, port=0)
    try:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        # A plain blocking client in a thread: the loop keeps answering meanwhile.
        status, ctype, body = await asyncio.to_thread(fetch, server.url + "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain; version=0.0.4")
        _, samples = parse(body)
        assert value(samples, "oxbus_events_published_total", event_type="OrderPlaced") == 1
        assert value(samples, "oxbus_workers") == 2

        status, ctype, body = await asyncio.to_thread(fetch, server.url + "/health")
        assert (status, ctype) == (200, "application/json")
        health = json.loads(body)
        assert health["status"] == "healthy"
        assert health["worker_count"] == 2
        assert health["heartbeats"] == {}

        status, _, _ = await asyncio.to_thread(fetch, server.url + "/nope")
        assert status == 404

        # Several scrapes at once, and the loop still runs handlers while they wait.
        results = await asyncio.gather(
            *(asyncio.to_thread(fetch, server.url + "/metrics") for _ in range(4)),
            bus.publish(OrderPlaced("o-2")),
        )
        assert all(r[0] == 200 for r in results[:4])
        await bus.stop()
        status, _, body = await asyncio.to_thread(fetch, server.url + "/health")
        assert (status, json.loads(body)["status"]) == (503, "stopped")
    finally:
        await server.close()
    with pytest.raises(OSError):
        await asyncio.to_thread(fetch, server.url + "/metrics")


async def test_the_endpoint_closes_idle_connections_on_close(make_bus: Any) -> None:
    bus = await make_bus()
    async with await oxbus.metrics.serve(bus) as server:
        # A client that connects and sends nothing must not keep close() waiting.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # headers never finished
        await writer.drain()
        await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
