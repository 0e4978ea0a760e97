"""A trading pipeline on oxbus: market data -> strategy -> orders -> risk.

It comes from a service whose own bus ran every handler in a ``ThreadPoolExecutor`` over
Redis Pub/Sub. Here the same components keep their *sync* handlers and their ``Event`` dataclass with an ``EventType``
Enum, on an in-memory oxbus ``EventBus``:

* ``TechnicalAnalyzer`` (priority 1) and ``StrategyEngine`` (priority 5) both handle
  ``MARKET_DATA_RECEIVED``; smaller numbers run first, so the strategy reads fresh indicators;
* ``OrderEngine`` calls a (simulated) blocking broker API, so it runs in the thread pool
  (``sync_handlers="thread"``); the cheap stages run on the loop;
* every event's ``aggregate_id`` is its symbol: with ``workers=4`` the symbols run concurrently
  while each symbol's ticks, signals and orders are handled in order;
* correlation is inherited (no ``correlation_id=event.correlation_id`` threading by hand), one
  malformed tick shows a failing handler isolated and counted, and ``get_stats()`` gives that
  bus's counters. There is no heartbeat here.

Run: .venv/bin/python examples/trading_pipeline.py
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from oxbus import EventBus, current_envelope


class EventType(Enum):  # a subset of the pipeline's EventType
    MARKET_DATA_RECEIVED = "market_data_received"
    INDICATORS_UPDATED = "indicators_updated"
    TRADING_SIGNAL = "trading_signal"
    ORDER_PLACED = "order_placed"
    ORDER_FAILED = "order_failed"
    RISK_ALERT = "risk_alert"


@dataclass
class Event:
    """The pipeline's event message, plus a short ``event_id`` so the output can name events."""

    event_type: EventType  # oxbus routes on the Enum's value
    source: str
    timestamp: datetime
    data: Dict[str, Any]
    correlation_id: Optional[str] = None  # a root event's correlation id, if given
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def aggregate_id(self) -> Optional[str]:  # the ordering key: one lane per symbol
        return self.data.get("symbol")


def create_event(event_type: EventType, source: str, data: Dict[str, Any],
                 correlation_id: Optional[str] = None) -> Event:
    """The pipeline bus's ``event_bus.create_event(...)``."""
    return Event(event_type, source, datetime.now(timezone.utc), data, correlation_id)


def on_loop(handler: Callable[[Event], None]) -> Callable[[Event], Any]:
    """Runs a sync handler on the loop on a bus whose sync handlers go to the thread pool.

    ``sync_handlers=`` is a bus-wide choice; an ``async def`` that calls the sync function and
    never suspends costs one call, and keeps the cheap stages off the pool.
    """

    async def run_on_loop(event: Event) -> None:
        handler(event)

    run_on_loop.__qualname__ = getattr(handler, "__qualname__", "handler")  # subscription name
    return run_on_loop


class TechnicalAnalyzer:
    """Moving averages per symbol; checks that each symbol's ticks arrive in order."""

    def __init__(self, bus: EventBus) -> None:
        self.short: Dict[str, Deque[float]] = defaultdict(lambda: deque(maxlen=5))
        self.long: Dict[str, Deque[float]] = defaultdict(lambda: deque(maxlen=20))
        self.last_seq: Dict[str, int] = {}
        self.out_of_order = 0
        bus.subscribe(EventType.MARKET_DATA_RECEIVED, on_loop(self.on_market_data), priority=1)

    def on_market_data(self, event: Event) -> None:
        symbol, seq, price = event.data["symbol"], event.data["seq"], event.data["price"]
        if seq <= self.last_seq.get(symbol, -1):
            self.out_of_order += 1
        self.last_seq[symbol] = seq
        if not isinstance(price, (int, float)):
            raise ValueError(f"malformed tick for {symbol}: price={price!r}")
        self.short[symbol].append(price)
        self.long[symbol].append(price)

    def averages(self, symbol: str) -> Optional[Tuple[float, float]]:
        s, lg = self.short[symbol], self.long[symbol]
        if len(lg) < lg.maxlen:  # type: ignore[operator]
            return None
        return sum(s) / len(s), sum(lg) / len(lg)


class StrategyEngine:
    """Moving-average crossover: BUY when the short average crosses above the long one."""

    def __init__(self, bus: EventBus, analyzer: TechnicalAnalyzer) -> None:
        self.bus, self.analyzer = bus, analyzer
        self.above: Dict[str, bool] = {}
        self.signals = 0
        bus.subscribe(EventType.MARKET_DATA_RECEIVED, on_loop(self.on_market_data), priority=5)

    def on_market_data(self, event: Event) -> None:
        symbol, price = event.data["symbol"], event.data["price"]
        avg = self.analyzer.averages(symbol)
        if avg is None or not isinstance(price, (int, float)):
            return
        above = avg[0] > avg[1]
        crossed = symbol in self.above and above != self.above[symbol]
        self.above[symbol] = above
        if crossed:
            self.signals += 1
            # On the loop, a sync handler publishes with publish_nowait: it inherits the tick's
            # correlation id, and its key (the symbol) keeps it behind the tick's other work.
            self.bus.publish_nowait(create_event(
                EventType.TRADING_SIGNAL, "StrategyEngine",
                {"symbol": symbol, "action": "BUY" if above else "SELL", "price": price,
                 "quantity": 100, "tick_seq": event.data["seq"]},
            ))


class OrderEngine:
    """Places orders through a blocking broker API: runs in the bus's thread pool."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.threads: set[str] = set()
        bus.subscribe(EventType.TRADING_SIGNAL, self.on_trading_signal)

    def execute_order(self, data: Dict[str, Any]) -> str:
        time.sleep(0.0002)  # the broker's REST call
        with self._lock:
            return f"ord-{next(self._ids)}"

    def on_trading_signal(self, event: Event) -> None:
        self.threads.add(threading.current_thread().name)
        order_id = self.execute_order(event.data)
        # Off the loop, a sync handler publishes with publish_threadsafe (it carries the
        # handler's context, so the order still joins the tick's correlation chain).
        self.bus.publish_threadsafe(create_event(
            EventType.ORDER_PLACED, "OrderEngine",
            {"order_id": order_id, **event.data},
        ))


class RiskManager:
    """Tracks positions (a SELL closes half a lot); raises one RISK_ALERT per symbol whose
    position goes past the limit; checks that each symbol's orders arrive in order."""

    def __init__(self, bus: EventBus, limit: int) -> None:
        self.bus, self.limit = bus, limit
        self.position: Dict[str, int] = defaultdict(int)
        self.last_tick: Dict[str, int] = {}
        self.out_of_order = 0
        self.orders = 0
        self.alerts: List[str] = []
        self.halted: set[str] = set()
        self.chain_sample: Optional[Dict[str, Any]] = None
        bus.subscribe(EventType.ORDER_PLACED, on_loop(self.on_order_placed))
        bus.subscribe(EventType.RISK_ALERT, on_loop(self.on_risk_alert), priority=1)

    def on_order_placed(self, event: Event) -> None:
        d = event.data
        self.orders += 1
        if d["tick_seq"] <= self.last_tick.get(d["symbol"], -1):
            self.out_of_order += 1
        self.last_tick[d["symbol"]] = d["tick_seq"]
        self.position[d["symbol"]] += d["quantity"] if d["action"] == "BUY" else -d["quantity"] // 2
        if self.chain_sample is None:
            env = current_envelope()
            assert env is not None
            self.chain_sample = {"order": d["order_id"], "symbol": d["symbol"],
                                 "event_id": env.event_id, "causation_id": env.causation_id,
                                 "correlation_id": env.correlation_id}
        if abs(self.position[d["symbol"]]) > self.limit and d["symbol"] not in self.halted:
            self.halted.add(d["symbol"])
            self.bus.publish_nowait(create_event(
                EventType.RISK_ALERT, "RiskManager",
                {"symbol": d["symbol"], "position": self.position[d["symbol"]]},
            ))

    def on_risk_alert(self, event: Event) -> None:
        self.alerts.append(f"{event.data['symbol']} position {event.data['position']}")


class DataCollector:
    """Publishes ticks: a random walk per symbol, interleaved across symbols."""

    def __init__(self, bus: EventBus, symbols: List[str]) -> None:
        self.bus, self.symbols = bus, symbols
        self.rng = random.Random(3)
        self.price = {s: 100.0 for s in symbols}

    async def on_price_update(self, symbol: str, price: Any, seq: int) -> None:
        await self.bus.publish(create_event(
            EventType.MARKET_DATA_RECEIVED, "DataCollector",
            {"symbol": symbol, "price": price, "seq": seq},
            correlation_id=f"tick-{symbol}-{seq}",  # the pipeline's own correlation id, kept as given
        ))

    async def run(self, ticks_per_symbol: int) -> int:
        n = 0
        for seq in range(ticks_per_symbol):
            for symbol in self.symbols:
                self.price[symbol] *= 1 + self.rng.gauss(0, 0.01)
                price: Any = round(self.price[symbol], 4)
                if symbol == "XRP" and seq == 100:
                    price = None  # one malformed tick
                await self.on_price_update(symbol, price, seq)
                n += 1
        return n


class OneLine(logging.Formatter):
    def formatException(self, ei: Any) -> str:  # noqa: N802 - logging's name
        return ""  # the handler failure shows as one line, without its traceback


async def main() -> None:
    log = logging.StreamHandler()
    log.setFormatter(OneLine("  log: %(levelname)s %(message)s"))
    logging.getLogger("oxbus").addHandler(log)
    logging.getLogger("oxbus").propagate = False

    symbols = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE", "DOT", "AVAX"]
    # max_queue_size=0 (unbounded): the sync stages publish their follow-up events with
    # publish_nowait, which cannot wait for room and raises QueueFull on a full bounded queue,
    # and a handler that awaits publish() on a full queue would wait for itself.
    bus = EventBus(workers=4, sync_handlers="thread", thread_pool_size=4, max_queue_size=0)
    analyzer = TechnicalAnalyzer(bus)
    strategy = StrategyEngine(bus, analyzer)
    orders = OrderEngine(bus)
    risk = RiskManager(bus, limit=2_500)
    collector = DataCollector(bus, symbols)

    print("== trading pipeline: market data -> strategy -> orders -> risk ==")
    print(f"  bus: workers=4, sync_handlers='thread' (OrderEngine), {len(symbols)} symbols")
    async with bus:
        t0 = time.perf_counter()
        ticks = await collector.run(ticks_per_symbol=2_000)
        await bus.drain()
        elapsed = time.perf_counter() - t0
        stats = bus.get_stats()
        full = bus.get_statistics()

    handled = full["events_processed"]
    print(f"  ticks published: {ticks}")
    print(f"  signals: {strategy.signals}, orders placed: {risk.orders}, "
          f"risk alerts: {len(risk.alerts)}")
    print(f"  order stage ran on threads: {', '.join(sorted(orders.threads))}")
    print(f"  out-of-order ticks: {analyzer.out_of_order}, out-of-order orders: {risk.out_of_order}")
    print(f"  throughput: {handled} events in {elapsed:.2f} s = {handled / elapsed:,.0f} events/s "
          f"({ticks / elapsed:,.0f} ticks/s)")
    print(f"  get_stats(): {stats}")
    print("  by event type:")
    for etype, counts in sorted(full["by_event_type"].items()):
        print(f"    {etype:22} {counts}")
    lat = full["handler_latency_ms"]
    print(f"  handler latency ms: p50={lat['p50']:.3f} p99={lat['p99']:.3f} max={lat['max']:.3f}")
    if risk.chain_sample:
        c = risk.chain_sample
        print(f"  correlation: order {c['order']} ({c['symbol']}) has correlation_id="
              f"{c['correlation_id']}, caused by signal {c['causation_id']}")
    print(f"  risk alerts: {sorted(risk.alerts)}")
    assert analyzer.out_of_order == 0 and risk.out_of_order == 0
    assert stats["failed"] == 1 and stats["processed"] == stats["published"]
    assert risk.orders == strategy.signals


if __name__ == "__main__":
    asyncio.run(main())
