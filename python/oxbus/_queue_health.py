"""The health of a RabbitMQ consumer group, read from RabbitMQ itself (``oxbus health
amqp://...``): its queue(s), the messages waiting in each, their consumers, and the dead
letters.

Reading changes nothing on the broker (passive declares). The group's queue is
``<exchange>.<group>``, or ``<exchange>.<group>.<i>`` for each partition::

    report = asyncio.run(read("amqp://guest:guest@127.0.0.1:5672/%2f", group="billing"))
"""

from __future__ import annotations

from typing import Any

from oxbus._oxbus import TransportCore
from oxbus.transports import redact

__all__ = ["read"]

#: Partition queues probed per round trip.
_STEP = 16


async def read(
    url: str, *, group: str, exchange: str = "oxbus.events", timeout: float = 5.0
) -> dict[str, Any]:
    """The group's report: ``status`` (healthy when every queue of the group has a consumer;
    degraded when one has none, so its messages wait; stopped when the group has no queue),
    ``reasons``, ``queues`` (name, ready messages, consumers), ``lag`` (ready messages in all)
    and ``dead_letters`` (messages in ``<queue>.dead``). Raises ``TransportError`` when
    RabbitMQ cannot be reached."""
    base = f"{exchange}.{group}"
    first = await TransportCore.rabbitmq_queues(url, [base, f"{base}.dead"], timeout)
    found: list[tuple[str, tuple[int, int]]] = []
    if first[0] is not None:
        found.append((base, first[0]))
    else:  # partitions: <base>.0, <base>.1, ... until one is missing
        i = 0
        while True:
            names = [f"{base}.{j}" for j in range(i, i + _STEP)]
            got = await TransportCore.rabbitmq_queues(url, names, timeout)
            for name, info in zip(names, got):
                if info is None:
                    break
                found.append((name, info))
            else:
                i += _STEP
                continue
            break
    reasons = []
    if not found:
        status = "stopped"
        reasons.append(f"no queue {base!r} (nor {base}.0, ...) on the broker: no member started")
    else:
        idle = [name for name, (_, consumers) in found if consumers == 0]
        status = "degraded" if idle else "healthy"
        if idle:
            reasons.append(f"queue(s) {idle} have no consumer: their messages wait")
    dead = first[1][0] if first[1] is not None else 0
    return {
        "status": status,
        "reasons": reasons,
        "kind": "rabbitmq",
        "url": redact(url),
        "exchange": exchange,
        "group": group,
        "partitions": len(found) if found and found[0][0] != base else 1,
        "lag": sum(ready for _, (ready, _) in found),
        "dead_letters": dead,
        "queues": [
            {"queue": name, "ready": ready, "consumers": consumers}
            for name, (ready, consumers) in found
        ],
    }
