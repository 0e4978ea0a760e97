"""Handler calls and handler failures, for ``oxbus.testing`` (which re-exports the public
names: import them from there).

``record_calls(bus)`` wraps each handler subscribed from then on in a recorder of its
``Call``s (for ``EventRecorder.calls`` and ``assert_handled``); ``HandlerErrors`` collects
the failure records the bus logs on the ``oxbus`` logger, as ``HandlerError``s (the pytest
plugin's ``event_bus`` fixture does both).
"""

from __future__ import annotations

import functools
import logging
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oxbus.bus import EventBus

__all__ = ["Call", "HandlerError", "HandlerErrors", "record_calls"]


def _name(target: Any) -> str:
    """A handler's or an event type's name, for messages."""
    return str(getattr(target, "__name__", None) or target)


# ------------------------------------------------------------------ handler calls


@dataclass
class Call:
    """One call of a recorded handler: its event, and how it ended (``ok``: returned;
    ``error``: what it raised; both unset while it runs)."""

    event: Any
    ok: bool = False
    error: BaseException | None = None


class _CallLog:
    def __init__(self, bus: EventBus) -> None:
        self._by_handler: dict[int, tuple[Any, Callable[..., Any], list[Call]]] = {}
        self._subscribe = bus.subscribe
        self._unsubscribe = bus.unsubscribe

    def of(self, handler: Any) -> list[Call]:
        entry = self._by_handler.get(id(handler))
        if entry is None:
            raise LookupError(f"{_name(handler)} was never subscribed to this bus")
        return list(entry[2])

    def wrapper(self, handler: Any) -> Callable[..., Any]:
        """The one recording wrapper of ``handler`` (the same for each of its subscriptions,
        so ``unsubscribe(event_type, handler)`` finds it)."""
        from oxbus.subscription import is_async as _is_async

        entry = self._by_handler.get(id(handler))
        if entry is not None:
            return entry[1]
        log: list[Call] = []
        wrapped: Callable[..., Any]
        if _is_async(handler):

            async def recorded_async(event: Any) -> Any:
                call = Call(event)
                log.append(call)
                try:
                    result = await handler(event)
                except BaseException as e:
                    call.error = e
                    raise
                call.ok = True
                return result

            wrapped = recorded_async
        else:

            def recorded(event: Any) -> Any:
                call = Call(event)
                log.append(call)
                try:
                    result = handler(event)
                except BaseException as e:
                    call.error = e
                    raise
                call.ok = True
                return result

            wrapped = recorded
        # __wrapped__: subscribe() checks the handler's own signature.
        functools.update_wrapper(wrapped, handler)
        self._by_handler[id(handler)] = (handler, wrapped, log)
        return wrapped


_call_logs: weakref.WeakKeyDictionary[Any, _CallLog] = weakref.WeakKeyDictionary()


def _call_log(bus: EventBus) -> _CallLog:
    log = _call_logs.get(bus)
    if log is None:
        raise RuntimeError(
            "handler calls are not recorded on this bus: call oxbus.testing.record_calls(bus) "
            "before subscribing (the event_bus fixture does)"
        )
    return log


def record_calls(bus: EventBus) -> None:
    """Records every call of the handlers subscribed to ``bus`` from now on (for
    ``EventRecorder.calls`` and ``assert_handled``): ``subscribe`` wraps each handler in a
    recorder that passes its event, result and exception through, under the handler's own
    name; ``unsubscribe(event_type, handler)`` still takes the original. Idempotent."""
    if bus in _call_logs:
        return
    from oxbus.subscription import qualname as _qualname

    log = _CallLog(bus)
    _call_logs[bus] = log

    def subscribe(event_type: Any, handler: Any, **options: Any) -> str:
        if not callable(handler):
            return log._subscribe(event_type, handler, **options)  # its error, unchanged
        options.setdefault("name", _qualname(handler))
        return log._subscribe(event_type, log.wrapper(handler), **options)

    def unsubscribe(subscription: Any, handler: Any = None) -> bool:
        if handler is not None and id(handler) in log._by_handler:
            handler = log._by_handler[id(handler)][1]
        return log._unsubscribe(subscription, handler)

    functools.update_wrapper(subscribe, log._subscribe)
    functools.update_wrapper(unsubscribe, log._unsubscribe)
    bus.subscribe = subscribe  # type: ignore[method-assign,assignment]
    bus.unsubscribe = unsubscribe  # type: ignore[method-assign]


# ------------------------------------------------------------------ handler failures


@dataclass
class HandlerError:
    """One failed handler call, as the bus logged it."""

    subscription: str
    event_type: str
    event_id: str
    attempt: int
    #: no retry follows: the event was dead-lettered
    final: bool
    error: BaseException = field(repr=False)
    message: str = field(repr=False, default="")

    def format(self) -> str:
        """The failure and its original traceback, as text."""
        tb = "".join(traceback.format_exception(type(self.error), self.error, self.error.__traceback__))
        return f"{self.message}\n{tb}"


class HandlerErrors:
    """Collects the failed handler calls of a bus (the ``event_bus`` fixture's; pytest's
    ``handler_errors`` fixture): the failure records the bus logs on the ``oxbus`` logger,
    with their exceptions, counted against the bus's ``events_failed``.

    The fixture fails the test at teardown when a handler call failed and the test neither
    took the failures (``take()``) nor is marked ``@pytest.mark.oxbus(allow_errors=True)``.
    """

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self._errors: list[HandlerError] = []
        self._taken = 0
        self._failed_at_start = bus.get_statistics()["events_failed"]
        self._handler = _FailureHandler(self._errors)
        self._logger = logging.getLogger("oxbus")
        self._logger.addHandler(self._handler)

    def take(self) -> list[HandlerError]:
        """The failures not taken yet, oldest first; taking them says the test expected
        them."""
        out = self._errors[self._taken:]
        self._taken = len(self._errors)
        return out

    def __len__(self) -> int:
        return len(self._errors)

    def unexpected(self) -> tuple[int, list[HandlerError]]:
        """How many of this bus's failed calls were not taken, and the records of those."""
        failed = self.bus.get_statistics()["events_failed"] - self._failed_at_start
        return max(0, failed - self._taken), self._errors[self._taken:]

    def report(self) -> str | None:
        """The teardown failure's text, or None when every failure was taken."""
        n, records = self.unexpected()
        if n == 0:
            return None
        parts = [
            (
                f"{n} handler call(s) failed during the test; if that is expected, take them "
                "(handler_errors.take()) or mark the test @pytest.mark.oxbus(allow_errors=True)."
            )
        ]
        dead = self.bus.dead_letters.list()
        if dead:
            parts.append(f"Dead letters: {[(d.subscription, d.error_type) for d in dead]}")
        if not records:
            parts.append("(no failure record: the 'oxbus' logger drops ERROR records)")
        parts += [r.format() for r in records]
        return "\n\n".join(parts)

    def close(self) -> None:
        """Stops collecting. Idempotent."""
        self._logger.removeHandler(self._handler)


class _FailureHandler(logging.Handler):
    def __init__(self, out: list[HandlerError]) -> None:
        super().__init__(logging.ERROR)
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        # The bus's failure record: exc_info and the event's ids as attributes; the
        # subscription, type and attempt as attributes or as the message's arguments.
        event_id = getattr(record, "event_id", None)
        if record.exc_info is None or record.exc_info[1] is None or event_id is None:
            return
        args = record.args if isinstance(record.args, tuple) else ()
        subscription = getattr(record, "subscription", None) or (args[0] if args else "?")
        attempt: Any = getattr(record, "attempt", None) or (args[2] if len(args) > 2 else 0)
        message = record.getMessage()
        self._out.append(
            HandlerError(
                subscription=str(subscription),
                event_type=str(getattr(record, "event_type", "?")),
                event_id=str(event_id),
                attempt=int(attempt),
                final="will retry" not in message,
                error=record.exc_info[1],
                message=message,
            )
        )
