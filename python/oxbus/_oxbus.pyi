"""Stubs of the native module. Import ``oxbus``, not this module."""

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, final

__all__ = [
    "AmqpBridgeCore",
    "BridgeCore",
    "BusCore",
    "Envelope",
    "Publish",
    "Resolver",
    "RetryPolicy",
    "StoreCore",
    "StoreFlusher",
    "TurnEnd",
    "TransportCore",
    "Worker",
    "__version__",
    "await_probe",
    "current_envelope",
    "decode_json",
    "encode_json",
    "new_event_id",
    "publisher",
    "publishing",
]

__version__: str
"""The installed version of oxbus."""

def new_event_id() -> str: ...
def await_probe(batched: bool, n: int) -> list[Awaitable[int]]: ...
def current_envelope() -> Envelope | None:
    """The [`Envelope`][oxbus.Envelope] of the event being handled, or None outside a handler.

    It follows the handler into the tasks it creates and into thread-pool calls:

    ```python
    async def send_receipt(event):
        env = oxbus.current_envelope()
        print(env.event_id, env.correlation_id, env.attempt, env.subscription)
    ```
    """
def encode_json(obj: Any) -> str: ...
def publishing(
    core: BusCore, event: Any, key: Any = None, correlation_id: Any = None
) -> Publish: ...
def publisher(core: BusCore) -> Callable[..., Publish]: ...
def decode_json(text: str) -> Any: ...
@final
class Envelope:
    """The event being handled and where it came from; `oxbus.current_envelope()` returns it
    inside a handler."""

    @property
    def event(self) -> Any:
        """The event object, exactly as published."""
    @property
    def event_id(self) -> Any:
        """The event's id (see [`DomainEvent.event_id`][oxbus.DomainEvent.event_id])."""
    @property
    def correlation_id(self) -> Any:
        """The id shared by every event of one causal chain."""
    @property
    def causation_id(self) -> Any:
        """The id of the event whose handler published this one (None for a root event)."""
    @property
    def key(self) -> Any:
        """The ordering key: `publish(key=...)`, else the event's `aggregate_id`, else None."""
    @property
    def attempt(self) -> int:
        """1 for the first call of a handler, 2 for its first retry, ..."""
    @property
    def subscription(self) -> str | None:
        """The name of the subscription being run."""
    @property
    def position(self) -> int | None:
        """The event's position in the durable log (None on an in-memory bus)."""
    @property
    def event_type(self) -> str:
        """The event's type key."""
    def _dead_letter(self, fields: dict[str, Any]) -> bool:
        """An event a broker delivered: `fields` become a dead letter on the broker, written
        before the message is acknowledged. False for an event of this process."""

@final
class RetryPolicy:
    """How often, and after how long, a failed handler call is tried again.

    `max_attempts` counts the first call (`subscribe(..., retry_count=N)` means `N + 1`
    attempts). The delay before retry n is `min(max_delay, base_delay * multiplier ** (n - 1))`,
    scaled by a uniform factor in `[1 - jitter, 1 + jitter]`. Only exceptions that are
    instances of `retry_on` are retried (default: every `Exception`); others go to the dead
    letters at once. A bad setting raises `ConfigurationError` naming it.

    ```python
    bus = EventBus(retry=RetryPolicy(max_attempts=4, base_delay=0.2, max_delay=5.0,
                                     retry_on=(ConnectionError, TimeoutError)))
    ```
    """

    def __new__(
        cls,
        max_attempts: int = 1,
        base_delay: float = 0.1,
        max_delay: float = 30.0,
        multiplier: float = 2.0,
        jitter: float = 0.1,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
    ) -> RetryPolicy: ...
    @property
    def retry_on(self) -> tuple[type[BaseException], ...]:
        """The exception classes worth a retry."""
    @property
    def max_attempts(self) -> int:
        """Calls in all, the first one included."""
    @property
    def base_delay(self) -> float:
        """Seconds before the first retry (before jitter)."""
    @property
    def max_delay(self) -> float:
        """The longest delay, in seconds."""
    @property
    def multiplier(self) -> float:
        """The factor between one delay and the next."""
    @property
    def jitter(self) -> float:
        """The random spread of each delay, as a fraction of it."""
    def delay(self, n: int) -> float:
        """Seconds before retry `n` (1-based), jitter included."""

@final
class Worker:
    def __new__(cls, core: BusCore, index: int, context: contextvars.Context | None = None) -> Worker: ...
    def __await__(self) -> Worker: ...
    def __iter__(self) -> Worker: ...
    def __next__(self) -> Any: ...
    def send(self, _value: Any) -> Any: ...
    def throw(self, typ: Any, val: Any = None, _tb: Any = None) -> Any: ...
    def close(self) -> None: ...
    @property
    def index(self) -> int: ...

@final
class Publish:
    """The awaitable of ``await bus.publish(event)`` on an in-memory bus (a coroutine)."""
    def __await__(self) -> Generator[Any, Any, bool]: ...
    def __iter__(self) -> Publish: ...
    def __next__(self) -> Any: ...
    def send(self, value: Any) -> Any: ...
    def throw(self, typ: Any, val: Any = None, _tb: Any = None) -> Any: ...
    def close(self) -> None: ...
    @property
    def __name__(self) -> str: ...
    @property
    def __qualname__(self) -> str: ...

@final
class BusCore:
    def __new__(
        cls,
        workers: Any,
        max_queue_size: Any,
        keyed: bool | None = None,
        threaded_sync: bool = False,
        executor: Any = None,
        retry: RetryPolicy | None = None,
    ) -> BusCore: ...
    def subscribe(
        self,
        target: Any,
        handler: Any,
        priority: int,
        name: str,
        threaded: bool,
        retry: RetryPolicy | None = None,
        retry_on: Any = None,
        timeout: float | None = None,
        breaker: tuple[int, float] | None = None,
        park: bool = False,
    ) -> int: ...
    def set_clock(self, sleep: Any, now: Any) -> None: ...
    def set_timeout_wrapper(self, wrap: Any) -> None: ...
    def park(self, sub_id: int, key_hash: int) -> None: ...
    def unpark(self, sub_id: int, key_hash: int) -> bool: ...
    def redeliver(
        self,
        event: Any,
        sub_id: int,
        position: int | None = None,
        correlation_id: Any = None,
        causation_id: Any = None,
        key: Any = None,
    ) -> bool: ...
    def unsubscribe(self, id: int) -> bool: ...
    def unsubscribe_handler(self, target: Any, handler: Any) -> int: ...
    def subscriptions(self) -> list[tuple[int, str, int, Any]]: ...
    def has_name(self, name: str) -> bool: ...
    def set_after_call(self, hook: Any, on_success: bool) -> None: ...
    def set_progress(self, store: StoreCore) -> None: ...
    def start(self, loop_: asyncio.AbstractEventLoop) -> None: ...
    def close(self, discard: bool) -> int: ...
    def ensure_running(self) -> None: ...
    def close_intake(self) -> None: ...
    def enter(self, fut: asyncio.Future[Any]) -> None: ...
    def withdraw(self, fut: asyncio.Future[Any]) -> None: ...
    @property
    def running(self) -> bool: ...
    def publish(
        self, event: Any, key: Any = None, correlation_id: Any = None, position: int | None = None
    ) -> asyncio.Future[Any] | None: ...
    def publish_nowait(self, event: Any, key: Any = None, correlation_id: Any = None) -> None: ...
    def publish_many(self, events: Iterator[Any]) -> tuple[int, asyncio.Future[Any] | None]: ...
    def drain_waiter(self) -> asyncio.Future[Any] | None: ...
    def add_waiter(self, target: Any, predicate: Any, fut: asyncio.Future[Any]) -> int: ...
    def remove_waiter(self, id: int) -> None: ...
    def set_dead_letters(self, n: int) -> None: ...
    @property
    def workers(self) -> int: ...
    @property
    def queue_size(self) -> int: ...
    def statistics(self) -> dict[str, Any]: ...
    def latency_buckets(self, bounds: list[float]) -> tuple[list[int], int, float]: ...
    def failures(self) -> list[tuple[str, str, int]]: ...
    def health(self) -> dict[str, Any]: ...

@final
class StoreFlusher:
    def __call__(self, *args: Any, **kwargs: Any) -> None: ...

@final
class Resolver:
    def __call__(self, *args: Any, **kwargs: Any) -> None: ...

_Row = tuple[int, str, int, str, int, str, str, str, str | None, str]

@final
class TurnEnd:
    def __call__(self, *args: Any, **kwargs: Any) -> None: ...

@final
class StoreCore:
    def __new__(
        cls, path: str, synchronous: str = "normal", read_only: bool = False
    ) -> StoreCore: ...
    @property
    def path(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def close_async(self) -> Awaitable[None]: ...
    def append(
        self, stream_id: str, events: list[Any], expected_version: int | None = None
    ) -> asyncio.Future[tuple[int, int]]: ...
    def log(
        self, event: Any, key: Any = None, correlation_id: Any = None
    ) -> int | asyncio.Future[list[int]]: ...
    def log_many(self, events: list[Any]) -> asyncio.Future[list[int]]: ...
    def settled(self) -> None: ...
    def mark_done(self, subscription: str, position: int) -> None: ...
    def read(self, stream_id: str, after_version: int) -> asyncio.Future[list[_Row]]: ...
    def read_all(self, after_position: int, limit: int) -> asyncio.Future[list[_Row]]: ...
    def at(self, position: int) -> asyncio.Future[_Row | None]: ...
    def save_snapshot(
        self, stream_id: str, version: int, state: str
    ) -> asyncio.Future[None]: ...
    def load_snapshot(
        self, stream_id: str
    ) -> asyncio.Future[tuple[str, int, str, str] | None]: ...
    def register_subscription(
        self, name: str, from_beginning: bool
    ) -> asyncio.Future[int]: ...
    def undelivered(self, subscription: str, start_after: int) -> asyncio.Future[list[_Row]]: ...
    def query(
        self, sql: str, params: list[Any] | None = None
    ) -> asyncio.Future[list[tuple[Any, ...]]]: ...
    def requeue_dead_letters(
        self, ids: list[int] | None = None
    ) -> asyncio.Future[list[tuple[int, str, int]]]: ...
    def add_dead_letter(
        self,
        position: int,
        subscription: str,
        attempts: int,
        first_failed_at: str,
        last_failed_at: str,
        error_type: str,
        error_message: str,
        traceback: str,
        key_hash: int | None = None,
        parked_behind: int | None = None,
    ) -> asyncio.Future[int]: ...
    def dead_letters(
        self,
    ) -> asyncio.Future[
        list[tuple[int, int, str, int, str, str, str, str, str, int | None, int | None]]
    ]: ...
    def remove_dead_letters(self, ids: list[int] | None = None) -> asyncio.Future[int]: ...
    def saga_write(
        self,
        saga: str,
        key: str,
        instance: tuple[str, str | None, str, str, str | None, str | None, int, bool] | None,
        applied: str | None,
        deadlines: list[tuple[str, float, str]] | None,
        events: list[tuple[Any, Any, Any, tuple[str, str] | None]],
        done: tuple[str, int] | None,
    ) -> asyncio.Future[list[int] | None]: ...

@final
class AmqpBridgeCore:
    @staticmethod
    def connect(
        url: str, queues: list[str], prefetch: int, connect_timeout: float,
        publish_timeout: float,
    ) -> Awaitable[AmqpBridgeCore]: ...
    def set_target(self, loop_: asyncio.AbstractEventLoop, callback: Any) -> None: ...
    def take(self) -> list[tuple[str, str, str]]: ...
    def ack(self, queue: str, receipt: str) -> None: ...
    def publish(self, exchange: str, routing_key: str, body: str) -> asyncio.Future[Any]: ...
    def stop(self) -> Awaitable[None]: ...

@final
class TransportCore:
    @staticmethod
    def redis(settings: dict[str, Any]) -> Awaitable[TransportCore]:
        """Redis Streams with `settings` (`oxbus.RedisStreams.native()`): a connected core."""
    @staticmethod
    def redis_group(
        url: str, stream: str, group: str
    ) -> Awaitable[tuple[int, float, list[tuple[str, float]], list[tuple[str, float] | None]]]:
        """A Redis Streams group's members and partition holders, read from Redis:
        (partitions, lease TTL in s, [(member, s left)], [(holder, s left) or None])."""
    @staticmethod
    def rabbitmq(settings: dict[str, Any]) -> Awaitable[TransportCore]:
        """RabbitMQ with `settings` (`oxbus.RabbitMQ.native()`): a connected core."""
    @staticmethod
    def rabbitmq_queues(
        url: str, queues: list[str], timeout: float
    ) -> Awaitable[list[tuple[int, int] | None]]:
        """Ready messages and consumers of each queue on RabbitMQ (None: no such queue)."""
    @staticmethod
    def dead_letters(
        place: dict[str, Any], timeout: float
    ) -> Awaitable[list[tuple[str, str, str, dict[str, str]]]]:
        """The dead letters at `place` (`Broker.dead_letter_place()`): [(id, source queue,
        payload, headers)], oldest first; changes nothing."""
    @staticmethod
    def retry_dead_letters(
        place: dict[str, Any], ids: list[str] | None, timeout: float
    ) -> Awaitable[int]:
        """Sends those of `ids` (None: all) back to their group, each for the subscription
        that failed only, and removes them: how many."""
    @staticmethod
    def remove_dead_letters(
        place: dict[str, Any], ids: list[str] | None, timeout: float
    ) -> Awaitable[int]:
        """Removes those of `ids` (None: all): how many."""
    @property
    def kind(self) -> str: ...
    def set_target(self, loop_: asyncio.AbstractEventLoop, callback: Any) -> None: ...
    def publish(
        self, event: Any, key: Any = None, correlation_id: Any = None
    ) -> asyncio.Future[str]: ...
    def publish_many(self, events: Any) -> asyncio.Future[Any]: ...
    def bind(self, patterns: list[str]) -> asyncio.Future[Any] | None:
        """Routes what `patterns` match to this member's group from now on: a future
        resolved once the broker applied it (later publishes of this transport are routed by
        it already), or None when there is nothing to wait for."""
    def dispatch(self, bus: BusCore, make_event: Any) -> tuple[int, list[str]]: ...
    def health(self) -> dict[str, Any]: ...
    def flush(self) -> Awaitable[None]: ...
    def pause(self) -> None: ...
    def stop(self) -> Awaitable[None]: ...
    @property
    def stopped(self) -> bool: ...

@final
class BridgeCore:
    @staticmethod
    def connect(url: str, channels: list[str]) -> Awaitable[BridgeCore]: ...
    def set_target(self, loop_: asyncio.AbstractEventLoop, callback: Any) -> None: ...
    def take(self) -> list[tuple[str, str]]: ...
    def publish(self, channel: str, payload: str) -> None: ...
    def stop(self) -> Awaitable[None]: ...
