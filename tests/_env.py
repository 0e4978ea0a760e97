"""What the machine may lack (Redis, Qt, root's privilege drop, a tmpfs mount, ...): outside CI
the test is skipped with the reason printed; under ``OXBUS_CI=1`` it fails instead, so a CI run
never counts a skipped test as passing."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import pytest

CI = os.environ.get("OXBUS_CI") == "1"


def unavailable(reason: str, *, module: bool = False) -> NoReturn:
    """Skips (the whole module with ``module``), or fails under ``OXBUS_CI=1``."""
    if CI:
        pytest.fail(f"OXBUS_CI=1 forbids skipping: {reason}", pytrace=False)
    print(f"\nskipped: {reason}", file=sys.__stderr__, flush=True)
    pytest.skip(reason, allow_module_level=module)
