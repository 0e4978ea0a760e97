"""``oxbus health URL``: a running bus's health report, printed as ``key: value`` lines (one
JSON object with ``--json``); exit 0 when healthy, 1 when degraded or stopped.

A report is a dict with at least ``status``; where it comes from depends on the URL's scheme
(:data:`SOURCES`): a source is ``(url, timeout, where) -> dict`` (``where``: the ``--group``
and ``--stream`` given) and fails with exit code 3 when nothing answers. A new source (a
broker's own view of a group, say) is one function and one entry there, plus its text form
in :data:`TEXT` if ``key: value`` lines do not suit it; the exit code stays as it is.
"""

from __future__ import annotations

import asyncio
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import click

from oxbus.cli._output import FAILED, UNREACHABLE, emit, fail, json_mode, json_option


def _metrics_endpoint(url: str, timeout: float, where: dict[str, str]) -> dict[str, Any]:
    """GET URL/health of ``oxbus.metrics.serve``: the bus's ``get_health_status()``."""
    target = url.rstrip("/")
    target = target if target.endswith("/health") else target + "/health"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as e:  # a server may answer 503 with the JSON when unhealthy
        body = e.read()
        e.close()
        if not body:
            fail(f"{target}: HTTP {e.code} {e.reason}", UNREACHABLE)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        fail(f"{target}: unreachable: {reason}", UNREACHABLE)
    try:
        report = json.loads(body)
        report["status"]
    except (ValueError, TypeError, KeyError):
        fail(f"{target}: the answer is not oxbus health JSON: {body[:200]!r}", UNREACHABLE)
    return report  # type: ignore[no-any-return]


def _redis_group(url: str, timeout: float, where: dict[str, str]) -> dict[str, Any]:
    """A Redis Streams group with partitions, read from Redis: its live members and which one
    holds each partition (see ``oxbus._group_health``)."""
    from oxbus import _group_health
    from oxbus.errors import TransportError
    from oxbus.transports import redact

    async def read() -> dict[str, Any]:
        return await asyncio.wait_for(_group_health.read(url, **where), timeout)

    try:
        return asyncio.run(read())
    except (TransportError, asyncio.TimeoutError) as e:
        fail(f"{redact(url)}: unreachable: {e or 'timed out'}", UNREACHABLE)


#: Where a report comes from, by the URL's scheme (a URL without one is http://).
SOURCES: dict[str, Callable[[str, float, dict[str, str]], dict[str, Any]]] = {
    "http": _metrics_endpoint,
    "https": _metrics_endpoint,
    "redis": _redis_group,
    "rediss": _redis_group,
    "unix": _redis_group,
}


def _group_lines(report: dict[str, Any]) -> list[str]:
    from oxbus import _group_health

    return _group_health.lines(report)


#: A report's text form, by the URL's scheme, where ``key: value`` lines do not suit it.
TEXT: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "redis": _group_lines,
    "rediss": _group_lines,
    "unix": _group_lines,
}


def _scheme(url: str) -> tuple[str, str]:
    """The URL (http:// added when it has no scheme) and its scheme."""
    if "://" not in url:
        url = "http://" + url
    return url, url.partition("://")[0].lower()


def _report(url: str, timeout: float, where: dict[str, str]) -> dict[str, Any]:
    url, scheme = _scheme(url)
    source = SOURCES.get(scheme)
    if source is None:
        raise click.BadParameter(
            f"{url!r}: health is read from a bus's metrics endpoint or a Redis group "
            f"({' or '.join(s + '://' for s in SOURCES)}), not from {scheme}://",
            param_hint="URL",
        )
    return source(url, timeout, where)


def _show(report: dict[str, Any]) -> None:
    for k, v in report.items():
        click.echo(f"{k + ':':<28}{json.dumps(v) if isinstance(v, (dict, list)) else v}")


@click.command(short_help="A running bus's health (its metrics endpoint), or a Redis group's.")
@click.argument("url")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for an answer.",
)
@click.option("--group", default="default", show_default=True, help="With a redis:// URL.")
@click.option("--stream", default="oxbus:events", show_default=True, help="With a redis:// URL.")
@json_option
def health(url: str, timeout: float, group: str, stream: str) -> None:
    """Print a running bus's health, from its metrics endpoint (GET URL/health, as served by
    oxbus.metrics.serve(bus, port=...)). URL is like http://localhost:9100 or localhost:9100.
    --json prints the report as one object.

    With a redis://, rediss:// or unix:// URL: the consumer group GROUP on STREAM as Redis
    holds it (with partitions=N): its live members and which one holds each partition.

    Exit 0 when the status is healthy, 1 when degraded or stopped (a Redis group: a partition
    held by no live member, or no member at all), 3 when URL does not answer.
    """
    report = _report(url, timeout, {"group": group, "stream": stream})
    text = TEXT.get(_scheme(url)[1])
    if json_mode():
        emit(report)
    elif text is not None:
        click.echo("\n".join(text(report)))
    else:
        _show(report)
    if report["status"] != "healthy":
        sys.exit(FAILED)
