"""Every example program runs to completion (they are documentation that must not rot)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _env import unavailable

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))
NEEDS_REDIS = {"redis_two_processes"}  # exits 1 when Redis is unreachable


def _redis_unreachable() -> str | None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=2).close()
    except OSError as e:
        return f"Redis at 127.0.0.1:6379 is unreachable ({e})"
    return None


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_exits_0(path: Path) -> None:
    if path.stem in NEEDS_REDIS and (reason := _redis_unreachable()) is not None:
        unavailable(f"{path.name} needs Redis: {reason}")
    p = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip(), "an example prints what it did"
