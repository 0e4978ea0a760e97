"""Event classes by type key, and turning decoded JSON back into them.

The store keeps an event as JSON (``oxbus._oxbus.encode_json``) and its type key; reading it
back, ``lookup`` finds the class and ``rebuild`` makes an instance from the decoded
dict. ``DomainEvent`` subclasses register themselves; other classes use
[`register_event`][oxbus.register_event]:

```python
@register_event
@dataclass
class ParcelShipped:
    parcel_id: str
    shipped_at: datetime

cls = lookup("ParcelShipped")          # ParcelShipped
rebuild(cls, {"parcel_id": "p1", "shipped_at": "2024-05-01T12:00:00+00:00"})
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import types
import typing
import weakref
from collections import abc
from collections.abc import Iterable, Iterator, Mapping, Set
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from typing import Any, Callable, Optional, TypeVar, Union, cast
from uuid import UUID

from oxbus.errors import SerializationError

__all__ = ["isolated", "lookup", "matches", "rebuild", "register_event", "type_key"]

T = TypeVar("T")
C = TypeVar("C", bound=type)
Conv = Optional[Callable[[Any], Any]]  # None: the decoded value is used as is

_IDENTITY = ("event_id", "occurred_at", "correlation_id", "causation_id")

_lock = threading.Lock()
_by_key: dict[str, type] = {}
_explicit: set[str] = set()  # keys given by register_event: automatic registration keeps off
_pending: list[type] = []  # DomainEvent subclasses created but not yet keyed
# Every class registered, automatically (False) or by register_event (True): what `_isolated`
# may put back on top.
_known: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def type_key(cls: type) -> str:
    """The type key of an event class, by the bus's rule: a class-level ``event_type`` (a str,
    or an Enum member whose value is used), else the class name.

    ```pycon
    >>> class OrderPlaced: event_type = "order.placed"
    >>> type_key(OrderPlaced)
    'order.placed'

    ```
    """
    for klass in cls.__mro__:
        if "event_type" in vars(klass):
            raw = vars(klass)["event_type"]
            if isinstance(raw, Enum):
                raw = raw.value
            if raw is None or hasattr(type(raw), "__get__"):  # a property, a method, ...
                break  # the instance decides: the class cannot know
            return raw if isinstance(raw, str) else str(raw)
    return cls.__name__


def register_event(cls: C) -> C:
    """Registers ``cls`` under its type key (see ``type_key``) and returns it, so it can
    be used as a decorator. ``DomainEvent`` subclasses are registered without it; an explicit
    registration wins over an automatic one with the same key.

    ```pycon
    >>> @register_event
    ... class Pinged:
    ...     pass
    >>> lookup("Pinged") is Pinged
    True

    ```
    """
    key = type_key(cls)
    with _lock:
        _flush()
        _by_key[key] = cls
        _explicit.add(key)
        _known[cls] = True
    return cls


def _auto_register(cls: type) -> None:
    """Called by ``DomainEvent.__init_subclass__``. The key is read later, on the first
    ``lookup``: decorators such as ``@dataclass`` run after ``__init_subclass__`` and may
    still set the class's ``event_type`` (a field default) or replace the class
    (``slots=True``)."""
    with _lock:
        _pending.append(cls)
        _known.setdefault(cls, False)


def _flush() -> None:
    # Caller holds _lock. Later classes replace earlier ones with the same key.
    pending = _pending[:]
    _pending.clear()
    for cls in pending:
        key = type_key(cls)
        if key not in _explicit:
            _by_key[key] = cls


def lookup(event_type: Any) -> type | None:
    """The class registered for a type key (a str, or an Enum member with a str value), or
    None:

    ```python
    class CartEmptied(DomainEvent): ...

    assert lookup("CartEmptied") is CartEmptied
    ```
    """
    if not _pending and type(event_type) is str:
        return _by_key.get(event_type)  # the common case: one dict read, no lock
    if isinstance(event_type, Enum):
        event_type = event_type.value
    with _lock:
        if _pending:
            _flush()
        return _by_key.get(event_type)


def isolated(*modules: types.ModuleType) -> contextlib.AbstractContextManager[None]:
    """A block with its own view of the registry, for tests: on entry the event classes of
    `modules` (defined or imported there) are registered on top, so they win over classes of
    the same type key from other modules (a later module over an earlier one; within one
    module, as anywhere, an explicit registration over an automatic one); on exit every registration made in the block is
    undone (classes defined in a test, whatever their names). The pytest plugin's
    `event_registry` fixture runs each test in one for its module, so test classes need no
    unique names:

    ```python
    with isolated(sys.modules[__name__]):
        class OrderPlaced(DomainEvent): ...      # forgotten after the block
        ...
    ```

    Kept on exit: the classes of a module first imported inside the block, when their type
    key was free before (the module is not imported again, so they would not come back).
    """
    return _isolated([list(vars(m).values()) for m in modules])


def _module_level(cls: type) -> bool:
    """Whether ``cls`` is an attribute of its module, under its qualified name."""
    obj: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is cls


@contextlib.contextmanager
def _isolated(groups: Iterable[Iterable[Any]]) -> Iterator[None]:
    with _lock:
        _flush()
        saved, saved_explicit = dict(_by_key), set(_explicit)
        chosen: dict[str, type] = {}
        for group in groups:  # a later group over an earlier one
            mine: dict[str, type] = {}
            for cls in group:
                if not isinstance(cls, type) or cls not in _known:
                    continue
                key = type_key(cls)
                # Within a group the registry's rule: explicit over automatic, else the later.
                prev = mine.get(key)
                if prev is None or _known[cls] or not _known[prev]:
                    mine[key] = cls
            chosen.update(mine)
        for key, cls in chosen.items():
            _by_key[key] = cls
            if _known[cls]:
                _explicit.add(key)
            else:
                _explicit.discard(key)
    try:
        yield
    finally:
        with _lock:
            _flush()
            added = [(key, cls) for key, cls in _by_key.items() if key not in saved]
        # Outside the lock: a module's __getattr__ may run code that defines events.
        kept = {key: cls for key, cls in added if _module_level(cls)}
        with _lock:
            _flush()
            _by_key.clear()
            _by_key.update(saved)
            _by_key.update(kept)
            _explicit.clear()
            _explicit.update(saved_explicit)
            _explicit.update(k for k in kept if _known.get(kept[k], False))


def matches(target: Any, event_type: str) -> bool:
    """Whether a subscription to ``target`` takes a stored event of type ``event_type`` as a
    restart rebuilds it (the registered class, else a dict), by the bus's routing rules: a
    class takes its subclasses, a string is a type key or an AMQP-style pattern (``*`` one
    word, ``#`` zero or more), an Enum member stands for its value. Used for rows that cannot
    be decoded, whose event object does not exist.

    ```pycon
    >>> matches("order.*", "order.placed"), matches("order.#", "order"), matches("a", "b")
    (True, True, False)

    ```
    """
    if isinstance(target, type):
        cls = lookup(event_type)
        return cls is not None and issubclass(cls, target)
    value = target.value if isinstance(target, Enum) else target
    if not isinstance(value, str):
        return False
    return _topic(value.split("."), event_type.split("."))


def _topic(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _topic(rest, words[1:])


def rebuild(cls: type[T], data: Mapping[str, Any]) -> T:
    """Turns a decoded dict (``decode_json`` output) back into an instance of ``cls``.

    * pydantic v2 models: ``cls.model_validate(data)``;
    * dataclasses: each field converted by its type hint (``datetime``, ``date``, ``time``,
      ``UUID``, ``Decimal``, Enum subclasses, nested dataclasses and models, ``list[X]``,
      ``set[X]``, ``tuple[X, ...]``, ``dict[str, X]``, ``Optional[X]`` and other unions),
      passed to ``__init__``; fields with ``init=False`` are set after construction;
    * other classes (plain ``DomainEvent`` subclasses among them): ``cls.__new__(cls)`` and the
      data put in the instance ``__dict__`` (converted by class-level annotations if any).
      ``__init__`` is not called: its signature is the user's (positional arguments, derived
      attributes, side effects), while the data is the instance's state, not its arguments.

    A ``DomainEvent``'s ``event_id``, ``occurred_at``, ``correlation_id`` and ``causation_id``
    are restored when the data has them. Failures raise ``SerializationError`` naming the
    class and field:

    ```python
    @dataclass
    class Paid(DomainEvent):
        amount: Decimal

    rebuild(Paid, {"amount": "10.50"}).amount  # Decimal('10.50')
    ```
    """
    if type(data) is not dict and not isinstance(data, Mapping):
        raise SerializationError(
            f"cannot rebuild {cls.__name__}: expected a dict of its fields, "
            f"got {type(data).__name__}"
        )
    try:
        return _rebuild(cls, data)  # type: ignore[no-any-return]
    except SerializationError:
        raise
    except Exception as e:
        raise SerializationError(
            f"cannot rebuild {cls.__name__} from fields {sorted(data)}: {type(e).__name__}: {e}"
        ) from e


# --- rebuilding -----------------------------------------------------------------------------


def _rebuild(cls: type, data: Mapping[str, Any]) -> Any:
    if _is_pydantic(cls):
        return cls.model_validate(data)  # type: ignore[attr-defined]
    if dataclasses.is_dataclass(cls):
        return _rebuild_dataclass(cls, data)
    return _rebuild_object(cls, data)


#: per dataclass: (name, init, converter) of each field, the field names, and whether every
#: field is an __init__ argument taken as it is (no converter)
_plans: dict[type, tuple[list[tuple[str, bool, Conv]], frozenset[str], bool]] = {}


def _rebuild_dataclass(cls: type, data: Mapping[str, Any]) -> Any:
    cached = _plans.get(cls)
    if cached is None:
        hints = _hints(cls)
        fields = dataclasses.fields(cls)
        plan = [(f.name, f.init, _converter(hints.get(f.name, Any))) for f in fields]
        cached = _plans[cls] = (
            plan,
            frozenset(f.name for f in fields),
            all(init and conv is None for _, init, conv in plan),
        )
    plan, names, plain = cached
    if plain:
        obj = cls(**{name: value for name, value in data.items() if name in names})
        if getattr(cls, "__oxbus_domain_event__", False):
            _restore_identity(obj, data, names)
        return obj
    kwargs: dict[str, Any] = {}
    late: list[tuple[str, Any]] = []
    for name, init, conv in plan:
        if name not in data:
            continue
        value = data[name]
        if conv is not None and value is not None:
            value = _convert(cls, name, conv, value)
        if init:
            kwargs[name] = value
        else:
            late.append((name, value))
    obj = cls(**kwargs)
    for name, value in late:
        object.__setattr__(obj, name, value)  # frozen dataclasses too
    if getattr(cls, "__oxbus_domain_event__", False):
        _restore_identity(obj, data, names)
    return obj


_object_convs: dict[type, dict[str, Conv]] = {}


def _rebuild_object(cls: type, data: Mapping[str, Any]) -> Any:
    convs = _object_convs.get(cls)
    if convs is None:
        convs = {name: _converter(tp) for name, tp in _hints(cls).items()}
        convs = {name: conv for name, conv in convs.items() if conv is not None}
        _object_convs[cls] = convs
    obj = cast(Any, cls).__new__(cls)
    state = {
        name: _convert(cls, name, convs.get(name), value)
        for name, value in data.items()
        if name not in _IDENTITY
    }
    obj.__dict__.update(state)
    if getattr(cls, "__oxbus_domain_event__", False):
        _restore_identity(obj, data, set())
    return obj


def _restore_identity(obj: Any, data: Mapping[str, Any], fields: Set[str]) -> None:
    # The identity attributes are non-data descriptors: the instance __dict__ wins.
    d = obj.__dict__
    for name in _IDENTITY:
        if name in fields or name not in data:
            continue
        value = data[name]
        if name == "occurred_at" and isinstance(value, str):
            value = datetime.fromisoformat(value)
        d[name] = value


def _convert(cls: type, name: str, conv: Conv, value: Any) -> Any:
    if conv is None or value is None:
        return value
    try:
        return conv(value)
    except SerializationError:
        raise
    except Exception as e:
        raise SerializationError(
            f"cannot rebuild {cls.__name__}.{name} from {value!r}: {type(e).__name__}: {e}"
        ) from e


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable forward reference: use what is a type
        if dataclasses.is_dataclass(cls):
            return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}
        return {}


def _is_pydantic(tp: Any) -> bool:
    pydantic = sys.modules.get("pydantic")  # a model cannot exist before pydantic is imported
    return pydantic is not None and isinstance(tp, type) and issubclass(tp, pydantic.BaseModel)


# --- converters by type hint ----------------------------------------------------------------

_converters: dict[Any, Conv] = {}
_UNION_TYPES: tuple[Any, ...] = (Union, getattr(types, "UnionType", Union))
_LISTS = (list, abc.Sequence, abc.MutableSequence, abc.Collection, abc.Iterable)
_SETS = (set, frozenset, abc.Set, abc.MutableSet)
_DICTS = (dict, abc.Mapping, abc.MutableMapping)


def _converter(tp: Any) -> Conv:
    """A function from the decoded JSON value to a value of type ``tp`` (None: as is)."""
    try:
        return _converters[tp]
    except KeyError:
        conv = _converters[tp] = _build(tp)
        return conv
    except TypeError:  # an unhashable hint
        return _build(tp)


def _build(tp: Any) -> Conv:
    if tp is Any or tp is object or isinstance(tp, (str, TypeVar, typing.ForwardRef)):
        return None
    supertype = getattr(tp, "__supertype__", None)  # NewType
    if supertype is not None:
        return _converter(supertype)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        return _converter(args[0])
    if origin is typing.Literal or origin is typing.ClassVar:
        return None
    if origin in _UNION_TYPES:
        return _union(args)
    if origin is not None:
        return _generic(origin, args)
    if not isinstance(tp, type):
        return None
    if tp in (str, int, bool, list, dict):
        return None
    if tp is float:
        return lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
    if tp in (set, frozenset, tuple):
        return lambda v: tp(v) if isinstance(v, list) else v
    if issubclass(tp, Enum):
        return lambda v: v if isinstance(v, tp) else tp(v)
    if issubclass(tp, datetime):
        return lambda v: tp.fromisoformat(v) if isinstance(v, str) else v
    if issubclass(tp, (date, time)):
        return lambda v: tp.fromisoformat(v) if isinstance(v, str) else v
    if issubclass(tp, UUID):
        return lambda v: tp(v) if isinstance(v, str) else v
    if issubclass(tp, Decimal):
        return lambda v: v if isinstance(v, Decimal) else tp(v if isinstance(v, str) else str(v))
    if issubclass(tp, tuple) and hasattr(tp, "_fields"):  # a NamedTuple, encoded as a list
        return lambda v: tp(*v) if isinstance(v, list) else v
    if issubclass(tp, (dict, list, str, int, float)):
        return None
    # Nested events and value objects: dataclasses, models, plain classes.
    return lambda v: _rebuild(tp, v) if isinstance(v, Mapping) else v


def _union(args: tuple[Any, ...]) -> Conv:
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        return _converter(options[0])  # Optional[X]: None is passed through by the caller
    convs = [(a, _converter(a)) for a in options]
    if all(c is None for _, c in convs):
        return None

    def union(v: Any) -> Any:
        # First option that takes the value: as is when it already has that type, else the
        # first conversion that succeeds, in the order written.
        for a, c in convs:
            if c is None and (not isinstance(a, type) or isinstance(v, a)):
                return v
        for _, c in convs:
            if c is not None:
                try:
                    return c(v)
                except Exception:  # noqa: BLE001, S112 - try the next option
                    continue
        return v

    return union


def _identity(v: Any) -> Any:
    return v


def _generic(origin: Any, args: tuple[Any, ...]) -> Conv:
    if origin in _LISTS or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        conv = _converter(args[0]) if args else None
        if conv is None and origin is not tuple:
            return None  # a JSON array is already a list
        item = conv or _identity
        make: Callable[[Any], Any] = tuple if origin is tuple else list
        return lambda v: make(item(x) for x in v) if isinstance(v, list) else v
    if origin is tuple:  # tuple[X, Y]
        items = [_converter(a) or _identity for a in args]
        return lambda v: tuple(c(x) for c, x in zip(items, v)) if isinstance(v, list) else v
    if origin in _SETS:
        elem = (_converter(args[0]) if args else None) or _identity
        make_set: Callable[[Any], Any] = frozenset if origin is frozenset else set
        return lambda v: make_set(elem(x) for x in v) if isinstance(v, list) else v
    if origin in _DICTS:
        key_conv = _converter(args[0]) if args else None
        value_conv = _converter(args[1]) if len(args) > 1 else None
        if key_conv is None and value_conv is None:
            return None
        k = key_conv or _identity
        val = value_conv or _identity
        return lambda v: (
            {k(a): (None if b is None else val(b)) for a, b in v.items()}
            if isinstance(v, dict)
            else v
        )
    return None
