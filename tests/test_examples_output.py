"""The migration, trading and allocation examples and the demo print what they claim (key
lines only)."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from oxbus.demo import pipeline

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(name: str) -> str:
    p = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.timeout(120)
def test_migration_before_after() -> None:
    out = run("migration_before_after.py")
    before, _, rest = out.partition("== after: oxbus")
    after, _, difference = rest.partition("== difference ==")
    assert "== before: pure-Python InMemoryEventBus, 4 workers ==" in before
    # 4 workers take o-1's three events at once; the fastest handler (shipping) wins
    assert "o-1: OrderShipped -> OrderPaid -> OrderCreated" in before
    assert "OUT OF ORDER" in before
    assert "await asyncio.sleep(0.1)" in before  # sleep-ok: checks the example's text
    for order in ("o-1", "o-2", "o-3"):
        assert f"{order}: OrderCreated -> OrderPaid -> OrderShipped    in order" in after
    assert "OUT OF ORDER" not in after and "invalid transition" not in after
    assert "waited for the handlers with await bus.drain()" in after
    assert "statistics: published=9 processed=9 failed=0 worker_count=4" in after
    assert re.search(r"handled in publish order: before [0-2]/3, after 3/3", difference)
    assert re.search(r"invalid status transitions: before [1-9]\d*, after 0", difference)
    assert "+ from oxbus import EventBusFactory, EventBusManager" in out


@pytest.mark.timeout(120)
def test_trading_pipeline() -> None:
    out = run("trading_pipeline.py")
    assert "ticks published: 16000" in out
    signals = re.search(r"signals: (\d+), orders placed: (\d+), risk alerts: (\d+)", out)
    assert signals is not None
    assert int(signals[1]) > 0 and signals[1] == signals[2] and int(signals[3]) > 0
    assert "out-of-order ticks: 0, out-of-order orders: 0" in out
    assert re.search(r"order stage ran on threads: oxbus-sync_\d", out)
    assert re.search(r"throughput: \d+ events in [\d.]+ s = [\d,]+ events/s", out)
    stats = re.search(r"get_stats\(\): \{'published': (\d+), 'received': (\d+), "
                      r"'processed': (\d+), 'failed': 1,", out)
    assert stats is not None and stats[1] == stats[2] == stats[3]
    assert re.search(r"market_data_received\s+\{'published': 16000, 'processed': 16000, "
                     r"'failed': 1\}", out)
    assert re.search(r"correlation: order ord-\d+ \(\w+\) has correlation_id=tick-\w+-\d+, "
                     r"caused by signal [0-9a-f]{8}", out)


@pytest.mark.timeout(120)
def test_allocation() -> None:
    out = run("allocation.py")
    assert "a second Allocate handler is refused" in out
    assert "order-1 RETRO-CLOCK x6: 201 batchref=batch-old" in out
    assert "order-3 MINIMAL-SOFA x3: 400 Out of stock" in out
    assert "failed in allocate: __main__.InvalidSku: Invalid sku NO-SUCH-THING" in out
    chain = out.split("causal chain (correlation id redis-msg-1", 1)[1].split("published to", 1)[0]
    lines = [re.sub(r" \[[0-9a-f]{8}\]", "", ln.rstrip()) for ln in chain.splitlines()[1:] if ln.strip()]
    assert lines == [
        "    ChangeBatchQuantity(ref=batch-old, qty=5) -> change_batch_quantity",
        "        Deallocated(orderid=order-2, sku=RETRO-CLOCK, qty=4)"
        " -> remove_allocation_from_read_model, reallocate",
        "            Allocate(orderid=order-2, sku=RETRO-CLOCK, qty=4) -> allocate",
        "                Allocated(orderid=order-2, sku=RETRO-CLOCK, qty=4, batchref=batch-old)"
        " -> publish_allocated_event, add_allocation_to_read_model",
        "        Deallocated(orderid=order-1, sku=RETRO-CLOCK, qty=6)"
        " -> remove_allocation_from_read_model, reallocate",
        "            Allocate(orderid=order-1, sku=RETRO-CLOCK, qty=6) -> allocate",
        "                Allocated(orderid=order-1, sku=RETRO-CLOCK, qty=6, batchref=batch-new)"
        " -> publish_allocated_event, add_allocation_to_read_model",
    ]
    assert '{"orderid": "order-1", "sku": "RETRO-CLOCK", "qty": 6, "batchref": "batch-new"}' in out
    assert "  order-1: RETRO-CLOCK -> batch-new" in out
    assert "  order-2: RETRO-CLOCK -> batch-old" in out
    assert "batch-old: purchased 5, allocated 4 (order-2), available 1" in out
    assert "email to stock@made.com: Out of stock for MINIMAL-SOFA" in out
    assert "failed=1 dead_lettered=1" in out


async def test_the_demo_prints_whole_correlation_and_causation_ids() -> None:
    # Ids are time-ordered UUIDs: 8-character prefixes of ids made in one run all look alike.
    lines: list[str] = []
    await pipeline(out=lines.append)
    audit = [m for line in lines if (m := re.search(r"corr=(\S+) cause=(\S+)", line))]
    assert audit, lines
    for m in audit:
        corr, cause = m.groups()
        assert str(uuid.UUID(corr)) == corr, m.group(0)  # a whole id, as the bus gives it
        assert cause == "None" or str(uuid.UUID(cause)) == cause, m.group(0)
    assert any(m.group(2) != "None" for m in audit), "a caused event is shown with its cause"
