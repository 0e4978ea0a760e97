"""``oxbus health URL``: a running bus's health report, printed as ``key: value`` lines (one
JSON object with ``--json``); exit 0 when healthy, 1 when degraded or stopped.

A report is a dict with at least ``status``; where it comes from depends on the URL's scheme
(:data:`SOURCES`): a source is ``(url, timeout) -> dict`` and fails with exit code 3 when
nothing answers. A new source (a broker's own view of a group, say) is one function and one
entry there; the printing and the exit code stay as they are.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import click

from oxbus.cli._output import FAILED, UNREACHABLE, emit, fail, json_mode, json_option


def _metrics_endpoint(url: str, timeout: float) -> dict[str, Any]:
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


#: Where a report comes from, by the URL's scheme (a URL without one is http://).
SOURCES: dict[str, Callable[[str, float], dict[str, Any]]] = {
    "http": _metrics_endpoint,
    "https": _metrics_endpoint,
}


def _report(url: str, timeout: float) -> dict[str, Any]:
    if "://" not in url:
        url = "http://" + url
    scheme = url.partition("://")[0].lower()
    source = SOURCES.get(scheme)
    if source is None:
        raise click.BadParameter(
            f"{url!r}: health is read from a bus's metrics endpoint "
            f"({' or '.join(s + '://' for s in SOURCES)}), not from {scheme}://",
            param_hint="URL",
        )
    return source(url, timeout)


def _show(report: dict[str, Any]) -> None:
    for k, v in report.items():
        click.echo(f"{k + ':':<28}{json.dumps(v) if isinstance(v, (dict, list)) else v}")


@click.command(short_help="A running bus's health, from its metrics endpoint.")
@click.argument("url")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for an answer.",
)
@json_option
def health(url: str, timeout: float) -> None:
    """Print a running bus's health, from its metrics endpoint (GET URL/health, as served by
    oxbus.metrics.serve(bus, port=...)). URL is like http://localhost:9100 or localhost:9100.
    --json prints the report as one object.

    Exit 0 when the status is healthy, 1 when degraded or stopped, 3 when URL does not
    answer with health JSON.
    """
    report = _report(url, timeout)
    if json_mode():
        emit(report)
    else:
        _show(report)
    if report["status"] != "healthy":
        sys.exit(FAILED)
