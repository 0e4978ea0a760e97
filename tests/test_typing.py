"""The public API's types do work for their users: mypy flags a handler annotated for another
event class than the one subscribed to (``subscribe``, ``@bus.on``), ``bus.wait_for`` and
``event_recorder.wait_for`` return the event's class, a subscription by type string, pattern or
Enum member still type-checks, and ``examples/typed_example.py`` passes ``mypy --strict``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent.parent / "examples" / "typed_example.py"

# Lines ending in "# E" must get a mypy error, and no other line may; "# R: T" lines must
# reveal the type T.
USER_CODE = textwrap.dedent(
    """\
    from __future__ import annotations

    from dataclasses import dataclass
    from enum import Enum

    from oxbus import DomainEvent, EventBus
    from oxbus.testing import EventRecorder


    @dataclass(frozen=True)
    class OrderPlaced(DomainEvent):
        order_id: str


    @dataclass(frozen=True)
    class ReceiptSent(DomainEvent):
        order_id: str


    class Kind(Enum):
        PLACED = "order.placed"


    async def send_receipt(event: ReceiptSent) -> None:
        pass


    def audit(event: DomainEvent) -> None:
        pass


    def from_elsewhere(event: dict[str, object]) -> None:
        pass


    async def main(bus: EventBus, recorder: EventRecorder) -> None:
        bus.subscribe(OrderPlaced, send_receipt)  # E
        bus.subscribe(OrderPlaced, send_receipt, True, 1, 3, name="receipts")  # E
        bus.subscribe(OrderPlaced, audit)  # a handler of a base class takes it
        bus.subscribe(ReceiptSent, send_receipt, priority=5)
        bus.subscribe(OrderPlaced, lambda e: print(e.order_id))
        bus.subscribe(OrderPlaced, lambda e: print(e.amount))  # E
        bus.subscribe("order.*", from_elsewhere)
        bus.subscribe("ReceiptSent", send_receipt)
        bus.subscribe(Kind.PLACED, audit)

        @bus.on(OrderPlaced)  # E
        async def misfiled(event: ReceiptSent) -> None:
            pass

        @bus.on(OrderPlaced, priority=2)
        async def ship(event: OrderPlaced) -> None:
            pass

        @bus.on("order.#")
        def log_it(event: dict[str, object]) -> None:
            pass

        placed = await bus.wait_for(OrderPlaced, lambda e: e.order_id == "o-1", timeout=1)
        reveal_type(placed)  # R: OrderPlaced
        recorded = await recorder.wait_for(ReceiptSent)
        reveal_type(recorded)  # R: ReceiptSent
        first = await recorder.first(OrderPlaced)
        reveal_type(first)  # R: OrderPlaced
        wrong: ReceiptSent = await bus.wait_for(OrderPlaced)  # E
        await bus.wait_for(OrderPlaced, lambda e: e.amount > 0)  # E
        anything = await bus.wait_for("order.*")
        reveal_type(anything)  # R: Any
        await ship(OrderPlaced("o-2"))
    """
)


def _mypy(*paths: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--hide-error-context",
            "--cache-dir",
            str(cache),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.timeout(320)
def test_mypy_flags_handlers_of_another_event_class_and_types_what_wait_for_returns(
    tmp_path: Path,
) -> None:
    pytest.importorskip("mypy", reason="mypy is a test dependency (pyproject's test extra)")
    user = tmp_path / "user_code.py"
    user.write_text(USER_CODE)
    p = _mypy(user, EXAMPLE, cache=tmp_path / "cache")
    lines = USER_CODE.splitlines()
    want_errors = {n for n, line in enumerate(lines, 1) if line.endswith("# E")}
    want_reveals = {
        n: line.rsplit("# R: ", 1)[1] for n, line in enumerate(lines, 1) if "# R: " in line
    }
    errors: dict[int, str] = {}
    reveals: dict[int, str] = {}
    for out in p.stdout.splitlines():
        m = re.match(r"(.+?):(\d+): (error|note): (.*)", out)
        assert m, out
        path, n, kind, text = m[1], int(m[2]), m[3], m[4]
        assert Path(path).name == user.name, f"typed_example.py fails mypy --strict: {out}"
        if kind == "error":
            errors[n] = text
        elif text.startswith("Revealed type is"):
            reveals[n] = text
    assert set(errors) == want_errors, (
        f"mypy errors on lines {sorted(errors)}, expected on {sorted(want_errors)}:\n{p.stdout}"
    )
    # The argument named in the handler's type: the subscribed class, not the handler's.
    assert "OrderPlaced" in errors[min(want_errors)] and "ReceiptSent" in errors[min(want_errors)]
    for n, t in want_reveals.items():
        assert re.search(rf'Revealed type is "(\w+\.)*{t}"', reveals.get(n, "")), (n, reveals)
