"""What the command-line tests share: a log written by a durable bus (5 orders, o-3's payment
dead-lettered, 4 payments, 1 note), CliRunner helpers, and a stand-in health endpoint.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

from click.testing import CliRunner, Result
from oxbus import DomainEvent, EventBus
from oxbus.cli import main


class OrderPlaced(DomainEvent):
    def __init__(self, order_id: str, amount: float) -> None:
        super().__init__()
        self.order_id, self.amount = order_id, amount

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class PaymentTaken(DomainEvent):
    def __init__(self, order_id: str) -> None:
        super().__init__()
        self.order_id = order_id

    @property
    def aggregate_id(self) -> str:
        return self.order_id


class Note(DomainEvent):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


def subscribe_pipeline(bus: EventBus, *, fail_on: str | None, seen: list[Any]) -> None:
    async def cli_pay(e: OrderPlaced) -> None:
        seen.append(e)
        if e.order_id == fail_on:
            raise ConnectionError(f"card gateway down for {e.order_id}")
        await bus.publish(PaymentTaken(e.order_id))

    async def cli_mail(e: PaymentTaken) -> None:
        pass

    bus.subscribe(OrderPlaced, cli_pay, name="cli_pay")
    bus.subscribe(PaymentTaken, cli_mail, name="cli_mail")


async def write_log(path: str) -> None:
    """5 orders (o-3's payment fails: one dead letter), 4 payments, 1 note."""
    bus = EventBus(store=path, workers=2)
    subscribe_pipeline(bus, fail_on="o-3", seen=[])
    async with bus:
        for i in range(5):
            await bus.publish(OrderPlaced(f"o-{i}", 10.0 + i))
        await bus.publish(Note("hello"))
        await bus.drain(timeout=10)
        assert len(bus.dead_letters) == 1


def runner() -> CliRunner:
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click 8.1
    except TypeError:
        return CliRunner()  # click >= 8.2 keeps stderr apart by itself


def run(*args: str, input: str | None = None) -> Result:
    return runner().invoke(main, list(args), input=input, catch_exceptions=False)


def run_json(*args: str) -> Any:
    """A single result: ``--json`` after the subcommand, exit 0, one JSON object."""
    r = run(*args, "--json")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return json.loads(r.stdout)


def run_lines(*args: str, code: int = 0) -> list[Any]:
    """A stream: ``--json`` after the subcommand, JSON Lines, each line one object."""
    r = run(*args, "--json")
    assert r.exit_code == code, (r.stdout, r.stderr)
    return [json.loads(line) for line in r.stdout.splitlines()]


class HealthHandler(http.server.BaseHTTPRequestHandler):
    """Answers GET /health with ``status`` and ``body`` (set them on the class)."""

    status = 200
    body = b""

    def do_GET(self) -> None:
        assert self.path == "/health"
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def health_endpoint() -> Iterator[tuple[str, type[HealthHandler]]]:
    """A health endpoint on a free port: its URL and its handler class."""
    handler = type("Handler", (HealthHandler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        t.join()
