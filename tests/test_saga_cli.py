"""``oxbus sagas DB`` lists the saga instances of a durable bus's log (text, or JSON Lines with
``--json``), filtered by state, saga and key; ``oxbus flow`` draws a saga's steps together."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import oxbus
import pytest
from _cli import run, run_lines
from _saga import Services, SgOrderCreated, SgOrderSaga, order
from oxbus import EventBus


class SgCliStrict(oxbus.Saga):
    """Fails every order over 100."""

    key = "order_id"

    @oxbus.step(SgOrderCreated, starts=True)
    async def created(self, e: Any) -> None:
        if e.total > 100:
            raise ValueError(f"total {e.total} over the limit")
        self.complete()


async def _write(db: str) -> None:
    """o-1 completed, o-2 compensated (the payment fails), o-3 running (inventory never
    answers); SgCliStrict: o-1, o-2, o-3 completed, o-4 failed."""
    for services, orders in (
        (Services(), [order("o-1")]),
        (Services(fail="payment"), [order("o-2")]),
        (Services(silent=("inventory",)), [order("o-3"), order("o-4", total=500)]),
    ):
        bus = EventBus(store=db)
        bus.register_saga(SgOrderSaga)
        bus.register_saga(SgCliStrict)
        services.attach(bus)
        async with bus:
            for o in orders:
                await bus.publish(o)
            await bus.drain(timeout=10)


@pytest.fixture(scope="module")
def saga_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    import asyncio

    db = str(tmp_path_factory.mktemp("sagacli") / "sagas.db")
    asyncio.run(_write(db))
    return db


def test_sagas_lists_every_instance_with_a_summary(saga_db: str) -> None:
    r = run("sagas", saga_db)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == [
        "SAGA",
        "KEY",
        "STATE",
        "STEP",
        "STEPS",
        "DEADLINES",
        "UPDATED",
        "ERROR",
    ]
    rows = [line.split()[:5] for line in lines[1:9]]
    assert rows == [
        ["SgCliStrict", "o-1", "completed", "created", "1"],
        ["SgCliStrict", "o-2", "completed", "created", "1"],
        ["SgCliStrict", "o-3", "completed", "created", "1"],
        ["SgCliStrict", "o-4", "failed", "-", "1"],
        ["SgOrderSaga", "o-1", "completed", "shipping_scheduled", "4"],
        ["SgOrderSaga", "o-2", "compensated", "failed", "2"],
        ["SgOrderSaga", "o-3", "running", "payment_processed", "2"],
        ["SgOrderSaga", "o-4", "running", "payment_processed", "2"],
    ]
    assert "created: ValueError: total 500 over the limit" in lines[4]
    assert lines[-1] == "8 instances: 2 running, 4 completed, 1 compensated, 1 failed"


def test_sagas_json_lines_filtered_by_state_saga_and_key(saga_db: str) -> None:
    running = run_lines("sagas", saga_db, "--state", "running")
    assert [(r["saga"], r["key"]) for r in running] == [
        ("SgOrderSaga", "o-3"),
        ("SgOrderSaga", "o-4"),
    ]
    o3 = running[0]
    assert o3["state"] == {"items": ["book", "pen"], "total": 30.0, "payment_id": "pay-o-3"}
    assert o3["compensations"] == ["SgCancelOrder", "SgRefundPayment"]
    assert (o3["deadlines"], o3["compensated"], o3["error"]) == ({}, False, None)
    assert set(o3) >= {"step", "steps", "correlation_id", "started_at", "updated_at"}
    [failed] = run_lines("sagas", saga_db, "--state", "failed", "--saga", "SgCliStrict")
    assert (failed["key"], failed["error"]) == (
        "o-4",
        "created: ValueError: total 500 over the limit",
    )
    [one] = run_lines("sagas", saga_db, "--saga", "SgOrderSaga", "--key", "o-2")
    assert (one["status"], one["compensated"], one["compensations"]) == ("compensated", True, [])


def test_sagas_exit_codes(saga_db: str, tmp_path: Path) -> None:
    r = run("sagas", saga_db, "--key", "nope")
    assert r.exit_code == 1
    assert "no saga instances with key=nope" in r.stderr
    [err] = run_lines("sagas", saga_db, "--saga", "Nope", code=1)
    assert err["error"]["exit_code"] == 1
    assert run("sagas", saga_db, "--state", "paused").exit_code == 2
    assert run("sagas", str(tmp_path / "missing.db")).exit_code == 3


def test_sagas_on_a_log_written_before_sagas_were_stored_finds_none(
    saga_db: str, tmp_path: Path
) -> None:
    old = tmp_path / "old.db"
    old.write_bytes(Path(saga_db).read_bytes())
    con = sqlite3.connect(old)
    for t in ("saga_instances", "saga_applied", "saga_deadlines"):
        con.execute(f"DROP TABLE {t}")
    con.commit()
    con.close()
    r = run("sagas", str(old))
    assert r.exit_code == 1 and "no saga instances" in r.stderr
    assert run("flow", str(old)).exit_code == 0


def test_flow_draws_a_sagas_steps_together_with_its_instances(saga_db: str) -> None:
    r = run("flow", saga_db)
    assert r.exit_code == 0, r.stderr
    assert (
        'subgraph s1["saga SgOrderSaga: 4 instances (1 compensated, 1 completed, 2 running)"]'
        in r.stdout
    )
    graph = json.loads(run("flow", saga_db, "--json").stdout)
    [strict, orders] = graph["sagas"]
    assert strict == {
        "name": "SgCliStrict",
        "steps": ["SgCliStrict.created"],
        "instances": {"completed": 3, "failed": 1},
    }
    assert "SgOrderSaga.payment_processed" in orders["steps"]
    published = {(e["from"], e["to"]) for e in graph["edges"] if e["kind"] == "published"}
    assert ("SgOrderSaga.order_created", "SgProcessPayment") in published
    assert ("SgOrderSaga.failed[SgPaymentFailed]", "SgCancelOrder") in published
    dot = run("flow", saga_db, "--format", "dot").stdout
    assert 'subgraph cluster_s0 { label="saga SgCliStrict: 4 instances' in dot


@pytest.mark.timeout(120)
def test_the_order_saga_example_prints_each_outcome() -> None:
    import subprocess
    import sys

    example = Path(__file__).parent.parent / "examples" / "order_saga.py"
    p = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=100, check=False
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "o-4: running at step order_created" in out
    assert "bus stopped while o-4 waits for its payment" in out
    for line in (
        "o-1: completed after 4 steps (tracking trk-o-1)",
        "o-2: compensated after 2 steps (PaymentDeclined)",
        "o-3: compensated after 3 steps (InventoryInsufficient)",
        "o-4: compensated after 2 steps (PaymentTimedOut)",
        "  o-3: RefundPayment\n  o-3: CancelOrder",
        "4 instances: 1 completed, 3 compensated",
    ):
        assert line in out, line
