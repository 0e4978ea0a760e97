"""Prometheus metrics for an [`EventBus`][oxbus.EventBus], and a tiny asyncio endpoint to scrape.

```python
text = bus.metrics()                                  # the Prometheus text format
server = await oxbus.metrics.serve(bus, port=9464)    # GET /metrics, GET /health (JSON)
...
await server.close()

# or, next to your own metrics (prometheus_client's registry and HTTP server), any
# number of buses, told apart by their ``bus`` label (``EventBus(name=...)``):
oxbus.metrics.register(bus)
```

The numbers come from the bus itself (``get_statistics()``, ``get_health_status()`` and the
engine's handler-latency histogram); nothing is counted twice. The text is produced by
``prometheus_client`` (a custom collector on a private registry, rendered by
``generate_latest``): the library owns escaping, sample naming (``_total``, ``_bucket``) and
the format's details, and the same collector plugs into an application's own registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import weakref
from datetime import date, datetime
from typing import Any, Callable, Iterator, Protocol, Sequence, Sized

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

__all__ = [
    "CONTENT_TYPE", "DEFAULT_BUCKETS", "BusCollector", "MetricsServer", "register", "render",
    "serve",
]

logger = logging.getLogger("oxbus")


class Bus(Protocol):
    """What the metrics read of an ``oxbus.EventBus`` (spelled here, so this module does not
    import the bus, which imports it)."""

    @property
    def is_running(self) -> bool: ...

    @property
    def dead_letters(self) -> Sized: ...

    @property
    def _core(self) -> Any: ...

    def get_statistics(self) -> dict[str, Any]: ...

    def get_health_status(self) -> dict[str, Any]: ...

#: Upper bounds (seconds) of the ``oxbus_handler_duration_seconds`` buckets: in-memory
#: handlers often take microseconds, so the scale starts far below Prometheus's default.
DEFAULT_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)

#: The content type of [`render`][oxbus.metrics.render]'s text (the classic text format,
#: which every Prometheus version scrapes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_MB = 1024.0 * 1024.0


class BusCollector:
    """A ``prometheus_client`` collector reading one or more buses at each scrape; every
    sample has a ``bus`` label, the bus's ``EventBus(name=...)`` ("oxbus" by default).

    Register it wherever ``prometheus_client`` takes collectors:

    ```python
    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(BusCollector(bus))
    ```

    Several buses share one registry through one collector (``BusCollector(orders, payments)``,
    ``collector.add(bus)``, or [`register`][oxbus.metrics.register], which keeps one collector per
    registry); their names must differ. ``collect()`` may run on any thread (the engine's counters
    are behind its own lock).
    """

    def __init__(self, *buses: Bus, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or any(b <= 0 for b in bounds):
            raise ValueError(f"buckets must be numbers > 0, got {list(buckets)!r}")
        self._buses: list[Bus] = []
        self._bounds = bounds
        for bus in buses:
            self.add(bus)

    def add(self, bus: Bus) -> None:
        """Reads ``bus`` too, from the next scrape on. ``ValueError`` if a bus of the same
        name is read already (its samples would be indistinguishable)."""
        name = _bus_name(bus)
        if any(b is bus for b in self._buses):
            return
        if any(_bus_name(b) == name for b in self._buses):
            raise ValueError(
                f"a bus named {name!r} is collected already: give each bus its own "
                "EventBus(name=...)"
            )
        self._buses.append(bus)

    def collect(self) -> Iterator[Metric]:
        """The metric families of the buses, read now."""
        fams: dict[str, Metric] = {}

        def family(kind: Callable[..., Metric], name: str, doc: str, labels: Sequence[str] = ()) -> Any:
            f = fams.get(name)
            if f is None:
                f = fams[name] = kind(name, doc, labels=["bus", *labels])
            return f

        for bus in self._buses:
            self._read(bus, family)
        yield from fams.values()

    def _read(self, bus: Bus, family: Callable[..., Any]) -> None:
        bus_name = _bus_name(bus)
        stats = bus.get_statistics()
        health = bus.get_health_status()
        by_type: dict[str, dict[str, int]] = stats.get("by_event_type", {})
        by_sub: dict[str, dict[str, int]] = stats.get("by_subscription", {})

        def counter(name: str, doc: str, value: float) -> None:
            family(CounterMetricFamily, name, doc).add_metric([bus_name], value)

        def gauge(name: str, doc: str, value: float) -> None:
            family(GaugeMetricFamily, name, doc).add_metric([bus_name], value)

        for name, key, doc in (
            ("oxbus_events_published", "published", "Events accepted by the bus."),
            (
                "oxbus_events_processed",
                "processed",
                "Events whose every subscription finished (success or final failure).",
            ),
        ):
            f = family(CounterMetricFamily, name, doc, ["event_type"])
            for event_type, counts in sorted(by_type.items()):
                f.add_metric([bus_name, event_type], counts.get(key, 0))

        # Per (event type, subscription) pair: a series for every pair an event was routed to,
        # 0 until a call fails; sum by (event_type) or by (subscription) for either view.
        f = family(
            CounterMetricFamily,
            "oxbus_handler_failures",
            "Handler calls that raised (every attempt counts), by event type and subscription.",
            ["event_type", "subscription"],
        )
        for event_type, subscription, n in bus._core.failures():
            f.add_metric([bus_name, event_type, subscription], n)

        for name, key, doc in (
            ("oxbus_handler_calls", "calls", "Handler calls made (every attempt)."),
            ("oxbus_retries", "retried", "Retry attempts scheduled."),
            (
                "oxbus_dead_lettered",
                "dead_lettered",
                "(event, subscription) pairs sent to the dead-letter queue.",
            ),
        ):
            f = family(CounterMetricFamily, name, doc, ["subscription"])
            for subscription, counts in sorted(by_sub.items()):
                f.add_metric([bus_name, subscription], counts.get(key, 0))

        counter(
            "oxbus_events_unrouted",
            "Events accepted that no subscription matched.",
            stats.get("events_unrouted", 0),
        )

        for name, doc, number in (
            ("oxbus_dead_letters", "Entries in the dead-letter queue now.", len(bus.dead_letters)),
            (
                "oxbus_queue_depth",
                "Events accepted and not yet handed to a handler.",
                stats["queue_size"],
            ),
            (
                "oxbus_max_queue_size",
                "The queue bound (0: unbounded).",
                stats.get("max_queue_size", 0),
            ),
            (
                "oxbus_retry_queue_depth",
                "Handler calls waiting for their retry.",
                stats["retry_queue_size"],
            ),
            ("oxbus_in_flight", "Events in handlers now.", stats["in_flight"]),
            ("oxbus_workers", "Configured workers.", stats["worker_count"]),
            ("oxbus_subscriptions", "Subscriptions.", stats["subscription_count"]),
            (
                "oxbus_blocked_publishers",
                "Publishers waiting for room in the queue.",
                stats.get("blocked_publishers", 0),
            ),
            (
                "oxbus_oldest_queued_age_seconds",
                "How long the oldest queued event has waited.",
                health.get("oldest_queued_age_seconds", 0.0),
            ),
            ("oxbus_uptime_seconds", "Seconds since the bus was created.", stats["uptime_seconds"]),
        ):
            gauge(name, doc, number)

        # Sagas (oxbus.saga), by saga: seed 001's saga completions by status, and more.
        by_saga: dict[str, dict[str, int]] = stats.get("by_saga", {})
        if by_saga:
            f = family(
                CounterMetricFamily,
                "oxbus_saga_instances",
                "Saga instances started, completed, compensated (compensations published) "
                "and failed.",
                ["saga", "outcome"],
            )
            skipped = family(
                CounterMetricFamily,
                "oxbus_saga_events_skipped",
                "Events a saga did not apply: ignored (no instance took them) or duplicate "
                "(applied already).",
                ["saga", "reason"],
            )
            running = family(
                GaugeMetricFamily, "oxbus_saga_instances_running", "Running instances.", ["saga"]
            )
            for saga, counts in sorted(by_saga.items()):
                for outcome in ("started", "completed", "compensated", "failed"):
                    f.add_metric([bus_name, saga, outcome], counts.get(outcome, 0))
                skipped.add_metric([bus_name, saga, "ignored"], counts.get("ignored", 0))
                skipped.add_metric([bus_name, saga, "duplicate"], counts.get("duplicates", 0))
                running.add_metric([bus_name, saga], counts.get("running", 0))

        # The engine times every handler call: the count is the calls made (the sum of
        # oxbus_handler_calls_total over the subscriptions).
        cumulative, count, total = bus._core.latency_buckets(self._bounds)
        buckets = [(_le(b), float(c)) for b, c in zip(self._bounds, cumulative)]
        buckets.append(("+Inf", float(count)))
        family(
            HistogramMetricFamily,
            "oxbus_handler_duration_seconds",
            "Handler call durations (every call).",
        ).add_metric([bus_name], buckets=buckets, sum_value=total)

        # The process's own memory and CPU: prometheus_client's ProcessCollector
        # (process_resident_memory_bytes, process_cpu_seconds_total), not a copy here.
        gauge(
            "oxbus_system_memory_total_bytes",
            "Memory of the machine.",
            health.get("system_memory_total_mb", 0.0) * _MB,
        )
        gauge(
            "oxbus_system_memory_available_bytes",
            "Memory available on the machine.",
            health.get("system_memory_available_mb", 0.0) * _MB,
        )

        beats: dict[str, dict[str, Any]] = health.get("heartbeats") or {}
        if beats:
            age = family(
                GaugeMetricFamily,
                "oxbus_heartbeat_age_seconds",
                "Seconds since the last heartbeat of each source.",
                ["source"],
            )
            stale = family(
                GaugeMetricFamily,
                "oxbus_heartbeat_stale",
                "1 when a source missed its heartbeat (none for 1.5 intervals).",
                ["source"],
            )
            for source, seen in sorted(beats.items()):
                age.add_metric([bus_name, source], seen["age_seconds"])
                stale.add_metric([bus_name, source], 1.0 if seen["stale"] else 0.0)

        gauge(
            "oxbus_healthy",
            "1 when the health status is healthy (0: degraded or stopped).",
            1.0 if health.get("status") == "healthy" else 0.0,
        )
        gauge("oxbus_up", "1 while the bus runs.", 1.0 if stats["is_running"] else 0.0)


def _bus_name(bus: Bus) -> str:
    return str(getattr(bus, "_name", "oxbus"))


_registered: weakref.WeakKeyDictionary[CollectorRegistry, BusCollector] = (
    weakref.WeakKeyDictionary()
)


def register(bus: Bus, registry: CollectorRegistry | None = None) -> BusCollector:
    """Exposes ``bus`` in ``registry`` (``prometheus_client.REGISTRY`` by default) through
    the one [`BusCollector`][oxbus.metrics.BusCollector] oxbus keeps there, so any number of
    buses (of distinct names) share a registry; returns that collector."""
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    collector = _registered.get(registry)
    if collector is None:
        collector = BusCollector(bus)
        registry.register(collector)
        _registered[registry] = collector
    else:
        collector.add(bus)
    return collector


def _le(bound: float) -> str:
    # The shortest text that parses back to the bound ("0.001", "1.0", "2.5").
    return repr(float(bound))


def render(bus: Bus, buckets: Sequence[float] = DEFAULT_BUCKETS) -> str:
    """The bus's metrics in the Prometheus text exposition format (``bus.metrics()``).

    ```pycon
    >>> print(render(bus))                                   # doctest: +SKIP
    # HELP oxbus_events_published_total Events accepted by the bus.
    # TYPE oxbus_events_published_total counter
    oxbus_events_published_total{bus="oxbus",event_type="OrderPlaced"} 3.0
    ...
    ```
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BusCollector(bus, buckets=buckets))
    ProcessCollector(registry=registry)  # what prometheus_client.REGISTRY has by default
    return generate_latest(registry).decode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def health_json(bus: Bus) -> str:
    """``bus.get_health_status()`` as JSON (datetimes in ISO 8601): the body of ``/health``."""
    return json.dumps(bus.get_health_status(), default=_json_default, sort_keys=True)


class MetricsServer:
    """The running endpoint returned by [`serve`][oxbus.metrics.serve]: ``host``, ``port``,
    ``url``, ``await close()``; also an async context manager."""

    def __init__(self, server: asyncio.AbstractServer, host: str, port: int) -> None:
        self._server = server
        self._connections: set[asyncio.Task[Any]] = set()
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """``http://host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stops listening and ends the connections still open. Idempotent."""
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def __aenter__(self) -> MetricsServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}>"


_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    503: "Service Unavailable",
}
#: A client gets this long to send its request line and headers.
_REQUEST_TIMEOUT = 10.0


async def serve(
    bus: Bus,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> MetricsServer:
    """Serves ``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON of
    ``get_health_status()``: HTTP 200 while the bus runs, healthy or degraded — the body's
    ``status`` says which — and 503 once it is stopped) on the running loop. ``port=0``
    picks a free port (see ``server.port``).

    The endpoint is a few dozen lines on ``asyncio.start_server``: one short request per
    connection, answered from the loop in well under a millisecond, never blocking it on
    I/O. Bind to ``127.0.0.1`` (the default) unless the scraper is elsewhere:

    ```python
    server = await oxbus.metrics.serve(bus, port=9464)
    print(server.url + "/metrics")
    await server.close()
    ```
    """
    holder: list[MetricsServer] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        conns = holder[0]._connections if holder else None
        if conns is not None and task is not None:
            conns.add(task)
        try:
            await asyncio.wait_for(_answer(bus, buckets, reader, writer), _REQUEST_TIMEOUT)
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:  # noqa: BLE001 - one bad request never ends the server
            logger.exception("metrics endpoint: request failed")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass
            if conns is not None and task is not None:
                conns.discard(task)

    server = await asyncio.start_server(handle, host, port)
    sockname = server.sockets[0].getsockname()
    result = MetricsServer(server, host, int(sockname[1]))
    holder.append(result)
    return result


async def _answer(
    bus: Bus,
    buckets: Sequence[float],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    request = await reader.readline()
    while True:  # headers: read and ignored
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
    parts = request.decode("latin-1").split()
    method = parts[0] if parts else ""
    target = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
    text = "text/plain; charset=utf-8"
    if len(parts) < 2:
        status, ctype, body = 400, text, b"bad request\n"
    elif target not in ("/metrics", "/health", "/"):
        status, ctype, body = 404, text, b"try /metrics or /health\n"
    elif method not in ("GET", "HEAD"):
        status, ctype, body = 405, text, b"GET only\n"
    elif target == "/health":
        report = health_json(bus)
        status = 200 if bus.is_running else 503
        ctype, body = "application/json", report.encode("utf-8")
    elif target == "/":
        status, ctype, body = 200, text, b"oxbus: /metrics /health\n"
    else:
        status, ctype, body = 200, CONTENT_TYPE, render(bus, buckets).encode("utf-8")
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer.write(header if method == "HEAD" else header + body)
    await writer.drain()
