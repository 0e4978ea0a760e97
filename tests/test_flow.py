"""The event-flow picture (issue 6): ``oxbus.flow`` and ``oxbus flow`` draw, from a durable
bus's log, event types → the subscriptions that handled them → the event types those
published, with counts and failure rates. The demo's durable pipeline is the data.

SVG and PNG need Graphviz's ``dot``: skipped without it, except in CI (``OXBUS_CI=1``), where
``.ci/run`` installs it and they must run.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from oxbus import DomainEvent, EventBus, SqliteEventStore
from oxbus import flow as flowmod
from oxbus.cli import main

needs_dot = pytest.mark.skipif(
    not flowmod.dot_available() and not os.environ.get("OXBUS_CI"),
    reason="Graphviz's dot is not installed (CI installs it and runs these)",
)


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo's durable pipeline, written by `oxbus demo --db` in its own process (so the
    demo's event classes stay out of this session's registry)."""
    path = str(tmp_path_factory.mktemp("flow") / "demo.db")
    p = subprocess.run(
        [sys.executable, "-m", "oxbus", "demo", "--events", "0", "--db", path, "--json"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["durable"]["dead_letters"] == 2
    return path


def invoke(*args: str) -> Any:
    try:
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click 8.1
    except TypeError:
        runner = CliRunner()  # click >= 8.2 keeps stderr apart by itself
    return runner.invoke(main, list(args), catch_exceptions=False)


def mermaid_nodes(text: str) -> dict[str, str]:
    """Node label's first line -> id."""
    nodes = {}
    for m in re.finditer(r'^\s+(\w+)(?:\(\["|\[\[")([^"<]+)', text, re.MULTILINE):
        nodes[m.group(2)] = m.group(1)
    return nodes


# ------------------------------------------------------------------------ the counts


def test_read_flow_counts_the_demo_pipeline(demo_db: str) -> None:
    f = flowmod.read_flow(demo_db)
    assert f.events == {
        "OrderPlaced": 12,
        "PaymentTaken": 10,
        "PaymentDeclined": 2,
        "StockReserved": 10,
        "ReceiptSent": 10,
        "OrderShipped": 10,
    }
    assert f.deliveries == {
        ("OrderPlaced", "take_payment"): 12,
        ("OrderPlaced", "reserve_stock"): 12,
        ("PaymentTaken", "send_receipt"): 10,
        ("PaymentTaken", "ship_order"): 10,
        ("PaymentDeclined", "notify_customer"): 2,
    }
    assert f.dead_letters == {("OrderPlaced", "reserve_stock"): 2}
    assert f.failure_rate("OrderPlaced", "reserve_stock") == pytest.approx(2 / 12)
    # children are attributed to the handler that published them, not to every handler of
    # the parent's type (OrderPlaced has two)
    assert f.published == {
        ("take_payment", "PaymentTaken"): 10,
        ("take_payment", "PaymentDeclined"): 2,
        ("reserve_stock", "StockReserved"): 10,
        ("send_receipt", "ReceiptSent"): 10,
        ("ship_order", "OrderShipped"): 10,
    }
    assert f.caused == {}
    assert f.handlers == [
        "notify_customer",
        "reserve_stock",
        "send_receipt",
        "ship_order",
        "take_payment",
    ]


def test_mermaid_has_the_nodes_edges_and_counts(demo_db: str) -> None:
    text = flowmod.to_mermaid(flowmod.read_flow(demo_db))
    assert text.startswith("flowchart LR\n")
    n = mermaid_nodes(text)
    assert set(n) == {
        "OrderPlaced",
        "PaymentTaken",
        "PaymentDeclined",
        "StockReserved",
        "ReceiptSent",
        "OrderShipped",
        "notify_customer",
        "reserve_stock",
        "send_receipt",
        "ship_order",
        "take_payment",
    }
    assert '(["OrderPlaced<br/>12 events"]):::event' in text
    assert '[["take_payment"]]:::handler' in text
    edges = re.findall(r'^\s+(\w+) -->\|"([^"]+)"\| (\w+)$', text, re.MULTILINE)
    by_name = {v: k for k, v in n.items()}
    named = {(by_name[a], by_name[b]): label for a, label, b in edges}
    assert named == {
        ("OrderPlaced", "take_payment"): "12 delivered",
        ("OrderPlaced", "reserve_stock"): "12 delivered, 2 dead letters (17%)",
        ("PaymentTaken", "send_receipt"): "10 delivered",
        ("PaymentTaken", "ship_order"): "10 delivered",
        ("PaymentDeclined", "notify_customer"): "2 delivered",
        ("take_payment", "PaymentTaken"): "10 published",
        ("take_payment", "PaymentDeclined"): "2 published",
        ("reserve_stock", "StockReserved"): "10 published",
        ("send_receipt", "ReceiptSent"): "10 published",
        ("ship_order", "OrderShipped"): "10 published",
    }
    # the failing edge is drawn red: linkStyle names its index among the edges
    failing = [
        i
        for i, (a, _, b) in enumerate(edges)
        if (by_name[a], by_name[b]) == ("OrderPlaced", "reserve_stock")
    ]
    assert re.search(rf"^\s+linkStyle {failing[0]} stroke:#c0392b", text, re.MULTILINE)


def test_dot_has_the_nodes_edges_and_counts(demo_db: str) -> None:
    text = flowmod.to_dot(flowmod.read_flow(demo_db))
    assert text.startswith("digraph oxbus_flow {") and "rankdir=LR" in text
    labels = dict(
        re.findall(r"^\s+(\w+) \[shape=box.*?label=<(?:<B>|<I>)([^<]+)<", text, re.MULTILINE)
    )
    ids = {v: k for k, v in labels.items()}
    assert '<B>OrderPlaced</B><BR/><FONT POINT-SIZE="11">12 events</FONT>' in text

    def edge(a: str, b: str) -> str:
        m = re.search(rf"^\s+{ids[a]} -> {ids[b]} \[(.*)\];$", text, re.MULTILINE)
        assert m, (a, b)
        return m.group(1)

    assert 'label="12 delivered\\n2 dead letters (17%)"' in edge("OrderPlaced", "reserve_stock")
    assert 'color="#c0392b"' in edge("OrderPlaced", "reserve_stock")
    assert 'label="12 delivered"' in edge("OrderPlaced", "take_payment")
    assert "color=" not in edge("OrderPlaced", "take_payment")
    assert 'label="2 published"' in edge("take_payment", "PaymentDeclined")
    assert 'label="10 published"' in edge("ship_order", "OrderShipped")
    assert text.count(" -> ") == 10


def test_json_graph(demo_db: str) -> None:
    r = invoke("flow", demo_db, "--json")
    assert r.exit_code == 0
    g = json.loads(r.stdout)
    assert {"name": "OrderPlaced", "count": 12} in g["event_types"]
    assert {"name": "reserve_stock", "deliveries": 12, "dead_letters": 2} in g["handlers"]
    assert {
        "from": "OrderPlaced",
        "to": "reserve_stock",
        "kind": "delivered",
        "count": 12,
        "dead_letters": 2,
        "failure_rate": 0.1667,
    } in g["edges"]
    assert {"from": "take_payment", "to": "PaymentDeclined", "kind": "published", "count": 2} in g[
        "edges"
    ]


# ------------------------------------------------------------------------- the command


def test_flow_command_text_formats(demo_db: str, tmp_path: Path) -> None:
    r = invoke("flow", demo_db)  # mermaid by default
    assert r.exit_code == 0 and r.stdout.startswith("flowchart LR")
    r = invoke("flow", demo_db, "--format", "dot")
    assert r.exit_code == 0 and r.stdout.startswith("digraph")
    out = tmp_path / "flow.gv"
    r = invoke("flow", demo_db, "-o", str(out))  # the format follows the suffix
    assert r.exit_code == 0 and out.read_text().startswith("digraph")
    out = tmp_path / "flow.mmd"
    assert invoke("flow", demo_db, "-o", str(out)).exit_code == 0
    assert out.read_text() == flowmod.to_mermaid(flowmod.read_flow(demo_db))


def test_flow_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert invoke("flow", str(tmp_path / "missing.db")).exit_code == 3
    empty = str(tmp_path / "empty.db")
    SqliteEventStore(empty).close()
    r = invoke("flow", empty)
    assert r.exit_code == 1 and "no events" in r.stderr
    assert invoke("flow", empty, "--format", "jpeg").exit_code == 2


def test_svg_and_png_without_dot_exit_3(
    demo_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flowmod.shutil, "which", lambda _name: None)
    r = invoke("flow", demo_db, "--format", "png", "-o", str(tmp_path / "x.png"))
    assert r.exit_code == 3 and "graphviz" in r.stderr.lower()
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(flowmod.RenderError):
        flowmod.render(flowmod.read_flow(demo_db), "svg")


@needs_dot
def test_png_is_drawn(demo_db: str, tmp_path: Path) -> None:
    out = tmp_path / "flow.png"
    r = invoke("flow", demo_db, "--format", "png", "-o", str(out))
    assert r.exit_code == 0, r.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height > 200  # left to right, large enough to read
    assert invoke("flow", demo_db, "-o", str(tmp_path / "inferred.png")).exit_code == 0
    assert (tmp_path / "inferred.png").read_bytes()[:4] == b"\x89PNG"


@needs_dot
def test_svg_is_drawn_with_the_labels(demo_db: str) -> None:
    r = invoke("flow", demo_db, "--format", "svg")
    assert r.exit_code == 0, r.stderr
    svg = r.stdout
    assert "<svg" in svg
    for text in (
        "OrderPlaced",
        "reserve_stock",
        "12 delivered",
        "2 dead letters (17%)",
        "10 published",
    ):
        assert text in svg


# ------------------------------------------------------------------ other logs, fallbacks


class Parent(DomainEvent):
    pass


class Child(DomainEvent):
    pass


class Other(DomainEvent):
    pass


async def test_a_log_without_handler_names_falls_back_to_the_parents_type(tmp_path: Path) -> None:
    """Events whose causation was set by hand (or logs written before the handler's name was
    recorded): a parent type with one handler gets the child; else a dashed type → type edge."""
    path = str(tmp_path / "hand.db")
    async with SqliteEventStore(path) as store:
        parent, other = Parent(), Other()
        await store.append("s", [parent, other], expected_version=0)
        children = [
            {"event_type": "Child", "causation_id": parent.event_id},
            {"event_type": "Child", "causation_id": other.event_id},
            {"event_type": "Child", "causation_id": other.event_id},
        ]
        await store.append("s", children, expected_version=2)
    with sqlite3.connect(path) as conn:  # parent handled by one subscription, other by none
        conn.execute("INSERT INTO progress VALUES ('only_handler', 1)")
    conn.close()
    f = flowmod.read_flow(path)
    assert f.published == {("only_handler", "Child"): 1}
    assert f.caused == {("Other", "Child"): 2}
    text = flowmod.to_mermaid(f)
    n = mermaid_nodes(text)
    assert f'{n["Other"]} -.->|"2 caused"| {n["Child"]}' in text
    assert f'{n["only_handler"]} -->|"1 published"| {n["Child"]}' in text
    assert "style=dashed" in flowmod.to_dot(f)


async def test_labels_with_quotes_and_brackets_are_escaped(tmp_path: Path) -> None:
    path = str(tmp_path / "odd.db")
    bus = EventBus(store=path)

    def odd_handler(event: Any) -> None:
        pass

    bus.subscribe('order."odd"<x>', odd_handler, name='say "hi" <b>')
    async with bus:
        await bus.publish({"event_type": 'order."odd"<x>'})
        await bus.drain(timeout=10)
    f = flowmod.read_flow(path)
    assert f.deliveries == {('order."odd"<x>', 'say "hi" <b>'): 1}
    mer = flowmod.to_mermaid(f)
    assert '"odd"' not in mer and "#quot;odd#quot;#lt;x#gt;" in mer
    dot = flowmod.to_dot(f)
    assert "order.&quot;odd&quot;&lt;x&gt;" in dot and "say &quot;hi&quot; &lt;b&gt;" in dot
    if flowmod.dot_available():
        assert flowmod.render(f, "svg").startswith(b"<?xml")
