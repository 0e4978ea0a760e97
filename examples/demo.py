"""The oxbus demo: an order pipeline on an in-memory bus.

Shows per-order ordering with several workers, correlation across a causal chain, a flaky
handler retried with backoff, backpressure, statistics, throughput and the health report.
Run it with `./dev.sh demo` (or `oxbus demo` once oxbus is installed). The code lives in
`oxbus/demo.py` so the installed package carries it.
"""

from __future__ import annotations

from oxbus.demo import run

if __name__ == "__main__":
    run()
