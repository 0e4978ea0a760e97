"""The interpreter exits cleanly with a bus in any state (issue 2, "Clean exit")."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from oxbus import EventBus

    mode = sys.argv[1]

    async def main():
        bus = EventBus(workers=2, sync_handlers="thread" if mode == "thread" else "loop")

        async def handler(event):
            if mode == "exit":
                sys.exit(0)
            await asyncio.sleep(0)  # sleep-ok: a real suspension, not a wait for the bus

        def sync_handler(event):
            pass

        bus.subscribe("tick", handler)
        bus.subscribe("tick", sync_handler)
        await bus.start()
        for i in range(20):
            await bus.publish({"event_type": "tick", "aggregate_id": i % 3})
        if mode in ("stop", "thread"):
            await bus.stop()
        elif mode == "exit":
            await bus.drain()

    asyncio.run(main())
    """
)

RUNS_PER_MODE = 80


def _run(mode: str) -> tuple[str, int, str]:
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60
    )
    return mode, p.returncode, p.stderr


@pytest.mark.timeout(600)
def test_hundreds_of_short_scripts_exit_with_status_0_and_no_fatal_error() -> None:
    modes = ["stop", "nostop", "exit", "thread"] * RUNS_PER_MODE
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_run, modes))
    bad = [(m, rc, err[-500:]) for m, rc, err in results if rc != 0 or "Fatal Python error" in err]
    assert not bad, f"{len(bad)} of {len(results)} runs failed, first: {bad[0]}"
    noisy = [(m, err[-500:]) for m, _, err in results if err.strip()]
    assert not noisy, f"{len(noisy)} runs wrote to stderr, first: {noisy[0]}"


STUCK = textwrap.dedent(
    """
    import asyncio, threading
    from oxbus import EventBus

    async def main():
        bus = EventBus(sync_handlers="thread")
        entered = threading.Event()

        def stuck(event):
            entered.set()
            threading.Event().wait()  # never returns

        bus.subscribe("tick", stuck)
        await bus.start()
        await bus.publish({"event_type": "tick"})
        await asyncio.to_thread(entered.wait)
        print("stopped", await bus.stop(timeout=1), flush=True)

    asyncio.run(main())
    """
)


def test_a_stuck_thread_pool_handler_does_not_keep_the_process_alive_after_stop() -> None:
    # The pool's threads used to be joined at exit: the interpreter never ended.
    p = subprocess.run([sys.executable, "-c", STUCK], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "stopped 1"
