"""The health of a Redis Streams consumer group with partition leases, read from Redis itself
(``oxbus health redis://...``): its live members and which member holds each partition.

Reading changes nothing in Redis. The members record the group's settings (partitions, lease
TTL) with every heartbeat, so only the stream and group names are needed::

    report = asyncio.run(read("redis://127.0.0.1:6379/0", group="billing", stream="oxbus:events"))
    print("\\n".join(lines(report)))
"""

from __future__ import annotations

from typing import Any

from oxbus._oxbus import TransportCore
from oxbus.transports import redact

__all__ = ["lines", "read"]


async def read(url: str, *, group: str, stream: str) -> dict[str, Any]:
    """The group's report: ``status`` (healthy when every partition is held by a live member;
    degraded while one is free; stopped with no live member), ``reasons``, ``members``
    (name, seconds before the membership lapses) and ``assignment`` (per partition: its
    stream, holder and seconds left on the lease). Raises ``TransportError`` when Redis
    cannot be reached."""
    partitions, ttl, members, owners = await TransportCore.redis_group(url, stream, group)
    live = {name for name, _ in members}
    assignment = [
        {
            "partition": i,
            "stream": f"{stream}:{i}",
            "owner": None if o is None else o[0],
            "expires_in": None if o is None else round(o[1], 3),
        }
        for i, o in enumerate(owners)
    ]
    reasons = []
    if not members:
        status = "stopped"
        reasons.append(f"no live member of group {group!r} on {stream!r} holds a lease")
    else:
        free = [a["partition"] for a in assignment if a["owner"] not in live]
        status = "degraded" if free else "healthy"
        if free:
            reasons.append(
                f"partition(s) {free} held by no live member (a hand-over under way, or a "
                "member died and its lease has not run out yet)"
            )
    return {
        "status": status,
        "reasons": reasons,
        "kind": "redis",
        "url": redact(url),
        "stream": stream,
        "group": group,
        "partitions": partitions,
        "lease_ttl": ttl,
        "members": [{"name": n, "expires_in": round(left, 3)} for n, left in members],
        "assignment": assignment,
    }


def lines(report: dict[str, Any]) -> list[str]:
    """The report as text: status, group, partitions, members, then one line per partition
    (``  oxbus:events:0  a  (lease 8.2 s left)``, or ``(free)``) and the reasons, if any."""
    out = [
        f"{'status:':<13}{report['status']}",
        f"{'group:':<13}{report['group']} on {report['stream']} ({report['url']})",
        f"{'partitions:':<13}{report['partitions']}, lease TTL {report['lease_ttl']} s",
        f"{'members:':<13}{', '.join(m['name'] for m in report['members']) or '(none)'}",
    ]
    width = max((len(a["stream"]) for a in report["assignment"]), default=0)
    for a in report["assignment"]:
        held = f"{a['owner']}  (lease {a['expires_in']:.1f} s left)" if a["owner"] else "(free)"
        out.append(f"  {a['stream']:<{width}}  {held}")
    out.extend(f"{'reason:':<13}{r}" for r in report["reasons"])
    return out
