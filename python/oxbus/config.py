"""Settings checks shared by the bus, its subscriptions and the transport options.

Each setting is checked once, where it is given, and a bad one raises
[`ConfigurationError`][oxbus.errors.ConfigurationError] naming the setting and the value:

```pycon
>>> oxbus.CircuitBreaker(failures=0)
Traceback (most recent call last):
oxbus.errors.ConfigurationError: failures must be an int >= 1, got 0

```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from oxbus._oxbus import RetryPolicy
from oxbus.errors import ConfigurationError

__all__ = ["BusSettings", "CircuitBreaker"]


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else ``ConfigurationError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
    return value


def non_negative_int(name: str, value: Any, note: str = "") -> int:
    """``value`` if it is an int >= 0 (not a bool), else ``ConfigurationError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be an int >= 0{note}, got {value!r}")
    return value


def seconds(name: str, value: Any) -> float | None:
    """``None``, or ``value`` as a float if it is a number of seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else ``ConfigurationError`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        names = " or ".join(repr(a) for a in allowed)
        raise ConfigurationError(f"{name} must be {names}, got {value!r}")
    return value


@dataclass(frozen=True)
class CircuitBreaker:
    """After ``failures`` failed calls in a row a subscription pauses for ``cool_down``
    seconds (its events wait, nothing is dropped), then tries again once: a success closes
    it, a failure opens it for another ``cool_down``:

    ```python
    bus.subscribe(OrderPlaced, charge, circuit_breaker=CircuitBreaker(5, cool_down=30))
    ```
    """

    failures: int = 5
    cool_down: float = 30.0

    def __post_init__(self) -> None:
        positive_int("failures", self.failures)
        if (
            isinstance(self.cool_down, bool)
            or not isinstance(self.cool_down, (int, float))
            or self.cool_down < 0
        ):
            raise ConfigurationError(f"cool_down must be a number >= 0, got {self.cool_down!r}")


@dataclass(frozen=True)
class BusSettings:
    """The bus's own settings (the engine checks ``max_queue_size`` and ``ordered``), checked
    once by ``check``."""

    workers: int
    handler_timeout: float | None
    max_event_bytes: int | None
    #: the sync handlers' thread pool size; None: sync handlers run on the loop
    thread_pool_size: int | None

    @classmethod
    def check(
        cls,
        *,
        workers: int | None,
        worker_count: int | None,
        sync_handlers: str,
        thread_pool_size: int | None,
        batch_size: int | None,
        batch_timeout_seconds: float | None,
        retry: Any,
        handler_timeout: float | None,
        max_event_bytes: int | None,
        clock: Any,
    ) -> BusSettings:
        """The settings ``EventBus(...)`` was given, or ``ConfigurationError`` naming the first
        bad one (``worker_count`` is the replaced bus's name of ``workers``; ``batch_size``
        and ``batch_timeout_seconds`` are checked, then ignored: dispatch is never delayed)."""
        if workers is not None and worker_count is not None and workers != worker_count:
            raise ConfigurationError(
                f"workers={workers!r} and worker_count={worker_count!r} disagree; give one"
            )
        n = workers if workers is not None else worker_count if worker_count is not None else 1
        choice("sync_handlers", sync_handlers, ("loop", "thread"))
        if batch_size is not None:
            positive_int("batch_size", batch_size)
        if batch_timeout_seconds is not None and not (
            isinstance(batch_timeout_seconds, (int, float)) and batch_timeout_seconds >= 0
        ):
            raise ConfigurationError(
                f"batch_timeout_seconds must be a number >= 0, got {batch_timeout_seconds!r}"
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {retry!r}")
        timeout = seconds("handler_timeout", handler_timeout)
        if max_event_bytes is not None:
            positive_int("max_event_bytes", max_event_bytes)
        if clock is not None and not (
            callable(getattr(clock, "sleep", None)) and callable(getattr(clock, "time", None))
        ):
            raise ConfigurationError(
                f"clock must have sleep(seconds) and time() methods, got {clock!r}"
            )
        pool = None
        if sync_handlers == "thread":
            pool = positive_int("thread_pool_size", thread_pool_size or 8)
        return cls(n, timeout, max_event_bytes, pool)
