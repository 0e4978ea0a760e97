"""What the bus records after a handler call: the failure log line, the dead letter (in the
store too, on a durable bus), and the ``event_storage.mark_event_processed`` call of the bus
being replaced.

The engine calls :meth:`FailureBook.after_call` per failure (and per call when there is an
``event_storage``): a durable bus records successes from Rust, so Python runs per failure,
not per event.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from oxbus._oxbus import Envelope
from oxbus.dead_letters import DeadLetter, DeadLetters, ProcessingResult
from oxbus.store import SqliteEventStore

__all__ = ["FailureBook"]

logger = logging.getLogger("oxbus")


def _signed(h: int | None) -> int | None:
    """A 64-bit lane hash as SQLite's signed integer."""
    return None if h is None else (h - 2**64 if h >= 2**63 else h)


class FailureBook:
    """The failure bookkeeping of one bus."""

    def __init__(
        self, dead_letters: DeadLetters, store: SqliteEventStore | None, event_storage: Any
    ) -> None:
        self._dead = dead_letters
        self._store = store
        self._mark = getattr(event_storage, "mark_event_processed", None)
        #: sub_id -> the coroutine function to await when the retry policy gives up on a call
        #: of that subscription (a saga step: its compensations), or None
        self.on_give_up: Callable[[int], Callable[[Envelope, BaseException], Awaitable[None]] | None] | None = None
        #: when each (event, subscription) pair first failed, until it succeeds or gives up
        self._first_failures: dict[tuple[int, str], datetime] = {}

    @property
    def wants_successes(self) -> bool:
        """Whether successful calls need :meth:`after_call` too (``event_storage``)."""
        return self._mark is not None

    def clear(self) -> None:
        self._first_failures.clear()

    def after_call(
        self,
        env: Envelope,
        sub_id: int,
        subscription: str,
        error: BaseException | None,
        duration_s: float | None,
        attempt: int,
        final: bool,
        park_key: int | None = None,
        parked: bool = False,
    ) -> Awaitable[Any] | None:
        """Called by the engine after a handler call (see the module's docstring)."""
        position = env.position
        if parked:
            self._dead_letter(env, sub_id, subscription, None, attempt, None, park_key, True)
            if self._store is not None and position is not None:
                self._store._core.mark_done(subscription, position)
            return None
        result = None
        if error is not None or self._mark is not None:
            result = ProcessingResult(
                event_id=env.event_id,
                success=error is None,
                error_message=None if error is None else f"{type(error).__name__}: {error}",
                processing_time_ms=0.0 if duration_s is None else duration_s * 1000.0,
                retry_attempt=attempt - 1,
                subscription=subscription,
            )
        if error is not None:
            self._failure(env, sub_id, subscription, error, attempt, final, result, park_key)  # type: ignore[arg-type]
        elif attempt > 1:
            self._first_failures.pop((id(env.event), subscription), None)
        gave_up = None
        if error is not None and final and self.on_give_up is not None:
            gave_up = self.on_give_up(sub_id)
        marked = None if self._mark is None else self._call_mark(env.event_id, result)
        if gave_up is not None:
            # A saga step: the hook records the instance's failure together with the event's
            # progress (one transaction on a durable bus).
            return self._both(gave_up(env, error), marked)  # type: ignore[arg-type]
        if marked is not None or self._mark is not None:
            return marked
        if self._store is not None and position is not None and error is not None and final:
            # Dead-lettered: not delivered again after a restart (successes are recorded by
            # the worker itself).
            self._store._core.mark_done(subscription, position)
        return None

    @staticmethod
    async def _both(first: Awaitable[Any], second: Awaitable[Any] | None) -> None:
        await first
        if second is not None:
            await second

    def _failure(
        self,
        env: Envelope,
        sub_id: int,
        subscription: str,
        error: BaseException,
        attempt: int,
        final: bool,
        result: ProcessingResult,
        park_key: int | None,
    ) -> None:
        now = datetime.now(timezone.utc)
        self._first_failures.setdefault((id(env.event), subscription), now)
        logger.error(
            "handler %s failed on %s (attempt %d%s): %s: %s [correlation_id=%s]",
            subscription,
            env.event_type,
            attempt,
            ", giving up" if final else ", will retry",
            type(error).__name__,
            error,
            env.correlation_id,
            exc_info=(type(error), error, error.__traceback__),
            extra={
                "correlation_id": env.correlation_id,
                "event_id": env.event_id,
                "causation_id": env.causation_id,
                "event_type": env.event_type,
                "subscription": subscription,
                "attempt": attempt,
            },
        )
        if final:
            self._dead_letter(env, sub_id, subscription, error, attempt, result, park_key, False)

    def _dead_letter(
        self,
        env: Envelope,
        sub_id: int,
        subscription: str,
        error: BaseException | None,
        attempts: int,
        result: ProcessingResult | None,
        park_key: int | None,
        parked: bool,
    ) -> None:
        now = datetime.now(timezone.utc)
        first = self._first_failures.pop((id(env.event), subscription), now)
        head = self._dead._head_of(sub_id, park_key) if parked else None
        if parked:
            etype, message, tb = (
                "oxbus.Parked",
                f"not handled: its key is parked behind dead letter "
                f"{head.id if head else '(gone)'} of {subscription}",
                "",
            )
        else:
            assert error is not None
            cls = type(error)
            etype = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
            message = str(error)
            tb = "".join(traceback.format_exception(cls, error, error.__traceback__))
        # A broker delivery: the dead letter goes to the broker too, written (confirmed)
        # before the message is acknowledged; its id is the same there.
        remote_id = str(uuid.uuid4())
        remote = env._dead_letter({
            "id": remote_id, "subscription": subscription, "error_type": etype,
            "error_message": message, "traceback": tb, "attempts": attempts,
            "first_failed_at": first.isoformat(), "last_failed_at": now.isoformat(),
        })
        entry = DeadLetter(
            id=remote_id if remote else self._dead._next_id(), event=env.event,
            subscription=subscription,
            attempts=attempts, first_failed_at=first, last_failed_at=now, error_type=etype,
            error_message=message, traceback=tb, final_result=result,  # type: ignore[arg-type]
            subscription_id=f"sub-{sub_id}", position=env.position, key_hash=park_key,
            parked_behind=head.id if head else None, key=env.key,
        )
        self._dead._add(entry)
        if parked:
            logger.warning("%s: %s", subscription, message)
        if self._store is not None and env.position is not None:
            fut = self._store._core.add_dead_letter(
                env.position, subscription, attempts, first.isoformat(), now.isoformat(),
                etype, message, tb, _signed(park_key), head.position if head else None,
            )

            def renamed(f: asyncio.Future[int]) -> None:
                if not f.cancelled() and f.exception() is None:
                    self._dead._renamed(entry, f.result())

            fut.add_done_callback(renamed)

    def _call_mark(self, event_id: Any, result: Any) -> Awaitable[Any] | None:
        try:
            out = self._mark(event_id, result)  # type: ignore[misc]
        except Exception:
            logger.exception("event_storage.mark_event_processed(%r) raised", event_id)
            return None
        if inspect.isawaitable(out):
            return self._await_mark(event_id, out)
        return None

    async def _await_mark(self, event_id: Any, aw: Awaitable[Any]) -> None:
        try:
            await aw
        except Exception:
            logger.exception("event_storage.mark_event_processed(%r) raised", event_id)
