#!/usr/bin/env python3
"""JSON encode/decode of typical events: oxbus's codec against the standard ``json`` module
and orjson, in the same run; optionally against another build of oxbus too.

    .venv/bin/python -m pip install orjson
    .venv/bin/python benches/bench_codec.py                  # ~40 s
    .venv/bin/python benches/bench_codec.py --quick          # smoke run (~3 s)
    .venv/bin/python benches/bench_codec.py --baseline /path/to/other/venv/bin/python

Payloads (built once, outside the timed region):
  event     a ``@dataclass`` ``DomainEvent`` with six fields (str, str, float, int, list of
            three str, bool); ~150 bytes of JSON
  dict      a flat ``dict`` event of eight entries (str, float, int, bool, None); ~190 bytes
  nested    an order: customer and address dicts, 12 lines each with a dict of attributes,
            non-ASCII text and floats; ~2.5 KB

Encode: ``oxbus.encode_json(x)``; ``json.dumps(x)`` (compact separators; the dataclass through
``dataclasses.asdict``, what it needs); ``orjson.dumps(x)`` (bytes; its native dataclass
support). Decode: the same JSON text (written by oxbus) through ``oxbus.decode_json``,
``json.loads`` and ``orjson.loads``; all three give equal objects (checked before timing).

Each cell is the best (lowest) of --repeat rounds of the mean time per call over --number
calls, as ``timeit`` advises: on a shared machine noise only ever adds time. Rounds are
interleaved (round 1 of every cell, then round 2, ...). With --baseline, every
round also runs the oxbus cells under that interpreter (a subprocess running this script with
--oxbus-round), so both builds are measured in the same conditions, alternately.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import timeit
from dataclasses import dataclass
from typing import Any, Callable

from oxbus import DomainEvent
from oxbus._oxbus import decode_json, encode_json

try:
    import orjson
except ImportError:  # the baseline interpreter needs only oxbus
    orjson = None


@dataclass
class OrderPlaced(DomainEvent):
    order_id: str
    customer_id: str
    amount: float
    quantity: int
    tags: list[str]
    paid: bool


def payloads() -> dict[str, Any]:
    event = OrderPlaced("o-12345", "c-987", 129.95, 3, ["web", "promo", "eu"], True)
    flat = {
        "event_type": "OrderPlaced",
        "order_id": "o-12345",
        "customer_id": "c-987",
        "amount": 129.95,
        "quantity": 3,
        "paid": True,
        "coupon": None,
        "occurred_at": "2026-01-01T12:00:00.123456+00:00",
    }
    nested = {
        "order_id": "o-12345",
        "customer": {
            "id": "c-987",
            "name": "Zoë Müller",
            "address": {"street": "Hauptstraße 5", "city": "Zürich", "zip": "8001"},
            "loyalty_points": 2**40,
        },
        "lines": [
            {
                "sku": f"sku-{i:04d}",
                "quantity": i + 1,
                "unit_price": 9.99 + i,
                "discount": None if i % 2 else 0.1,
                "attributes": {"colour": "blue", "size": "M", "gift": i % 3 == 0},
            }
            for i in range(12)
        ],
        "totals": {"net": 1234.56, "tax": 234.57, "currency": "EUR"},
        "notes": ["leave at the door", "fragile ✓"],
    }
    return {"event": event, "dict": flat, "nested": nested}


def encoders(name: str, value: Any) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {"oxbus": lambda: encode_json(value)}
    plain = dataclasses.asdict if dataclasses.is_dataclass(value) else (lambda v: v)
    out["json"] = lambda: json.dumps(plain(value), separators=(",", ":"), ensure_ascii=False)
    if orjson is not None:
        out["orjson"] = lambda: orjson.dumps(value)
    return out


def decoders(text: str) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {"oxbus": lambda: decode_json(text)}
    out["json"] = lambda: json.loads(text)
    if orjson is not None:
        out["orjson"] = lambda: orjson.loads(text)
    return out


def cells(oxbus_only: bool) -> dict[tuple[str, str, str], Callable[[], object]]:
    """(payload, op, library) -> the call to time."""
    out = {}
    for name, value in payloads().items():
        text = encode_json(value)
        for op, calls in (("encode", encoders(name, value)), ("decode", decoders(text))):
            for lib, call in calls.items():
                if oxbus_only and lib != "oxbus":
                    continue
                out[(name, op, lib)] = call
        # Same objects from every decoder, before anything is timed.
        decoded = [call() for call in decoders(text).values()]
        assert all(d == decoded[0] for d in decoded), name
    return out


def one_round(table: dict[tuple[str, str, str], Callable[[], object]], number: int) -> dict:
    return {key: timeit.timeit(call, number=number) / number * 1e9 for key, call in table.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=5_000, help="calls per cell per round")
    ap.add_argument("--repeat", type=int, default=15, help="rounds (the best is reported)")
    ap.add_argument("--quick", action="store_true", help="2,000 calls, 3 rounds")
    ap.add_argument("--baseline", metavar="PYTHON", help="also time the oxbus cells under this interpreter")
    ap.add_argument("--oxbus-round", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.number, args.repeat = 2_000, 3
    if args.oxbus_round:  # one round of the oxbus cells, for another interpreter's run
        res = one_round(cells(oxbus_only=True), args.number)
        print(json.dumps([[*k, v] for k, v in res.items()]))
        return 0

    table = cells(oxbus_only=False)
    runs: dict[tuple[str, str, str], list[float]] = {k: [] for k in table}
    print(f"# {platform.python_implementation()} {platform.python_version()}, load {os.getloadavg()[0]:.2f}, "
          f"{args.number} calls x {args.repeat} rounds", flush=True)
    for _ in range(args.repeat):
        if args.baseline:
            done = subprocess.run(
                [args.baseline, __file__, "--oxbus-round", "--number", str(args.number)],
                capture_output=True, text=True, check=True,
            )
            for name, op, lib, ns in json.loads(done.stdout):
                runs.setdefault((name, op, "baseline"), []).append(ns)
        for key, ns in one_round(table, args.number).items():
            runs[key].append(ns)
    med = {k: min(v) for k, v in runs.items()}

    libs = ["oxbus"] + (["baseline"] if args.baseline else []) + ["json"] + (["orjson"] if orjson else [])
    head = "| payload | op | " + " | ".join(f"{lib} ns" for lib in libs) + " | json/oxbus | orjson/oxbus |"
    if args.baseline:
        head += " baseline/oxbus |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for name in payloads():
        for op in ("encode", "decode"):
            row = [med.get((name, op, lib)) for lib in libs]
            ox = med[(name, op, "oxbus")]
            ratios = [med[(name, op, "json")] / ox, med[(name, op, "orjson")] / ox if orjson else float("nan")]
            if args.baseline:
                ratios.append(med[(name, op, "baseline")] / ox)
            print(f"| {name} | {op} | " + " | ".join(f"{v:,.0f}" for v in row) + " | "
                  + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    print(f"# load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
