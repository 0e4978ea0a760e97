"""``oxbus dlq amqp://... (or redis://...) list|show|retry|purge --group G``: a broker
group's dead letters, read from (and retried to, purged from) the broker itself, as every
member's ``bus.dead_letters`` sees them. Same output shapes as the SQLite form, with ``queue``
(the queue or stream a retry sends the message back to) in place of ``position``.

A new broker is its options class's ``dead_letter_place()`` (its URL schemes are read from
``oxbus.transports``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from oxbus.cli._output import (
    DEAD_LETTER_KEYS, UNREACHABLE, emit, fail, json_mode, list_dead_letters, show_dead_letter,
)
from oxbus.dead_letters import read_broker_row
from oxbus.errors import TransportError

__all__ = ["Source", "list_", "purge", "retry", "show", "source"]


T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """A broker group's dead-letter place."""

    place: dict[str, Any]
    shown: str  # the URL without its password, and the queue
    timeout: float


def source(
    target: str, *, group: str, exchange: str, queue: str | None, stream: str, timeout: float
) -> str | Source:
    """``target`` as a DB path, or a broker group's dead-letter place when it is a broker's
    URL (``amqp://``, ``redis://``, ...)."""
    from oxbus.transports import Broker, RabbitMQ, RedisStreams, redact

    scheme = target.partition("://")[0].lower() if "://" in target else ""
    options: Broker
    if scheme in RabbitMQ.schemes:
        options = RabbitMQ(target, group=group, exchange=exchange, queue=queue)
    elif scheme in RedisStreams.schemes:
        options = RedisStreams(target, group=group, stream=stream)
    else:
        return target
    place = options.dead_letter_place()
    assert place is not None
    where = place.get("queue") or f"{place['stream']} group {group}"
    return Source(place, f"{redact(target)} {where}", timeout)


def _run(src: Source, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()`` in a new event loop (the native awaitables need a running one)."""

    async def go() -> T:
        return await call()

    try:
        return asyncio.run(go())
    except TransportError as e:
        fail(f"{src.shown}: unreachable: {e}", UNREACHABLE)


def _rows(src: Source) -> list[dict[str, Any]]:
    """The dead letters, oldest first, in the shape of ``oxbus dlq DB list``."""
    from oxbus._oxbus import TransportCore

    out = []
    rows = _run(src, lambda: TransportCore.dead_letters(src.place, src.timeout))
    for row in rows:
        did, queue, payload, _ = row
        body, f = read_broker_row(row)
        b = body if isinstance(body, dict) else {}
        out.append(
            {
                "id": did,
                "queue": queue,
                "subscription": f["subscription"],
                "attempts": f["attempts"],
                "first_failed_at": f["first_failed_at"].isoformat(),
                "last_failed_at": f["last_failed_at"].isoformat(),
                "error_type": f["error_type"],
                "error_message": f["error_message"],
                "traceback": f["traceback"],
                "event_type": b.get("event_type"),
                "event_id": b.get("event_id"),
                "key": b.get("key"),
                "data": b.get("data") if body is not None else payload,
                "metadata": b.get("metadata"),
            }
        )
    return out


def _plural(n: int) -> str:
    return f"{n} dead letter{'' if n == 1 else 's'}"


def list_(src: Source) -> None:
    list_dead_letters(_rows(src), (("SUBSCRIPTION", lambda r: r["subscription"] or "(group)"),))

def show(src: Source, did: str) -> None:
    found = [r for r in _rows(src) if r["id"] == did]
    if not found:
        fail(f"no dead letter with id {did} in {src.shown}")
    show_dead_letter(found[0], DEAD_LETTER_KEYS + ("queue", "event_type", "event_id", "key"))


def retry(src: Source, ids: list[str] | None) -> None:
    """Sends dead letters back to their queue (each for the subscription that failed only)
    and removes them; ``None``: all. An unknown id changes nothing (exit 1)."""
    from oxbus._oxbus import TransportCore

    listed = [r["id"] for r in _rows(src)]
    missing = [i for i in ids or () if i not in listed]
    if missing:
        fail(f"no dead letter with id {missing[0]} in {src.shown}; nothing retried")
    n = _run(src, lambda: TransportCore.retry_dead_letters(src.place, ids, src.timeout))
    if json_mode():
        emit({"retried": n, "ids": listed if ids is None else ids})
    else:
        click.echo(f"retried {_plural(n)}: sent back to the group")


def purge(src: Source, yes: bool) -> None:
    from oxbus._oxbus import TransportCore

    n = len(_rows(src))
    if n and not yes and not click.confirm(f"delete {n} dead letters from {src.shown}?", err=True):
        fail("nothing purged")
    n = _run(src, lambda: TransportCore.remove_dead_letters(src.place, None, src.timeout))
    if json_mode():
        emit({"purged": n})
    else:
        click.echo(f"purged {_plural(n)}")
