"""Known CPU use, to check the ``cpu_percent`` the bus reports (this process over a fixed window,
percent of one core) against this process's own clocks."""

from __future__ import annotations

import time
from types import TracebackType

# The bus's window and the test's start and end a few milliseconds apart (and, off Linux, sysinfo
# reads CPU time in 10 ms clock ticks): a few percent either way over a window of tenths of a
# second, plus the bus's own work around the window.
TOLERANCE = 12.0


def burn(cpu_seconds: float) -> None:
    """Spins until this process has used ``cpu_seconds`` more CPU time."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


class Window:
    """``with Window() as w: ...`` measures this process's CPU use over the block, in percent of
    one core (``w.percent``), the way ``cpu_percent`` is defined, and its length (``w.wall``,
    seconds)."""

    percent: float
    wall: float

    def __enter__(self) -> Window:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        cpu, wall = time.process_time() - self._cpu, time.perf_counter() - self._wall
        self.percent, self.wall = 100.0 * cpu / wall, wall
