"""The JSON codec of stored events: ``encode_json`` / ``decode_json`` (native) and
``oxbus.registry`` (``register_event``, ``lookup``, ``rebuild``).

Round trips for every supported type and kind of event class; refusals that name the field
path and the type; no crash on cycles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Callable, Optional
from uuid import UUID, uuid4

import pytest
from _env import unavailable

import oxbus
from oxbus import DomainEvent, OxbusError, SerializationError
from oxbus.registry import lookup, rebuild, register_event, type_key


def _native() -> tuple[Callable[[Any], str], Callable[[str], Any]]:
    """The codec functions live in the native module (the store is their public user)."""
    from oxbus import _oxbus

    return _oxbus.encode_json, _oxbus.decode_json


encode_json, decode_json = _native()


def roundtrip(obj: Any) -> Any:
    return rebuild(type(obj), decode_json(encode_json(obj)))


# --- classes under test ----------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Kind(str, enum.Enum):
    PLACED = "order.placed"


class PlainPlaced(DomainEvent):
    """A plain DomainEvent subclass; its __init__ does not take its attributes as they are."""

    placed_at: datetime

    def __init__(self, order_id: str, amount: float, *, lines: int = 1) -> None:
        super().__init__()
        self.order_id = order_id
        self.amount = amount
        self.placed_at = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
        self.lines = [f"line-{i}" for i in range(lines)]
        self._cache = "private: not stored"


@dataclass
class Line:
    sku: str
    price: Decimal
    qty: int = 1


@dataclass
class Address:
    street: str
    city: str


@dataclass
class OrderPlaced(DomainEvent):
    order_id: str
    lines: list[Line]
    address: Address
    color: Color
    placed_at: datetime
    note: Optional[str] = None  # noqa: UP045 - typing.Optional is what is tested here
    totals: dict[str, Decimal] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    _secret: str = "private"


@dataclass(frozen=True)
class FrozenShipped(DomainEvent):
    parcel_id: UUID
    shipped_on: date
    window: tuple[time, time]
    level: Level
    weight: float
    label: str = field(init=False, default="")

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "label", f"parcel {self.parcel_id}")


@register_event
@dataclass
class PlainDataclass:
    name: str
    when: datetime
    big: int
    ratio: float
    nested: Address | None = None
    computed: int = field(init=False, default=0)


@dataclass
class PricedItem:
    price: Any


@dataclass
class BadOrder:
    items: list[PricedItem]


class SlotsOnly:
    __slots__ = ("x",)

    def __init__(self) -> None:
        self.x = 1


class Typed(DomainEvent):
    event_type = "codec.typed"


class EnumTyped(DomainEvent):
    event_type = Kind.PLACED


# --- scalars and containers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        10**40,
        -(10**40),
        1.5,
        -0.0,
        1e300,
        5e-324,
        0.1 + 0.2,
        "",
        "plain",
        'quote " backslash \\ slash /',
        "control \n\t\r\b\f \x00 \x1f",
        "unicode é € 😀 \u2028",
        [],
        {},
        [1, [2, [3, {"a": [None]}]]],
        {"nested": {"list": [1, "two", 3.0, False, None], "empty": {}}},
    ],
)
def test_json_values_encode_as_standard_json_and_decode_back_equal(value: Any) -> None:
    text = encode_json(value)
    assert json.loads(text) == value
    back = decode_json(text)
    assert back == value
    assert type(back) is type(value)
    if isinstance(value, float):
        assert math.copysign(1.0, back) == math.copysign(1.0, value)


def test_big_integers_keep_every_digit_both_ways() -> None:
    for n in (2**64, -(2**64) - 1, 3**200, -(10**100) + 7):
        assert encode_json(n) == str(n)
        assert decode_json(str(n)) == n
        assert decode_json(encode_json({"n": [n]})) == {"n": [n]}


def test_floats_stay_floats_and_ints_stay_ints() -> None:
    assert decode_json(encode_json([1.0, 1, 100.0, 1e16])) == [1.0, 1, 100.0, 1e16]
    assert [type(x) for x in decode_json(encode_json([1.0, 1]))] == [float, int]


def test_tuples_and_sets_encode_as_arrays() -> None:
    assert decode_json(encode_json((1, "a", (2,)))) == [1, "a", [2]]
    assert sorted(decode_json(encode_json({3, 1, 2}))) == [1, 2, 3]
    assert sorted(decode_json(encode_json(frozenset({"x", "y"})))) == ["x", "y"]


def test_builtin_subclasses_encode_like_their_base() -> None:
    class MyInt(int):
        def __str__(self) -> str:
            return "not a number"

    class MyStr(str):
        pass

    class MyDict(dict):  # type: ignore[type-arg]
        pass

    assert encode_json(MyInt(7)) == "7"
    assert encode_json(MyInt(10**30)) == str(10**30)
    assert encode_json(MyStr("s")) == '"s"'
    assert decode_json(encode_json(MyDict(a=[1]))) == {"a": [1]}


def test_decoder_reads_escapes_and_surrogate_pairs() -> None:
    text = json.dumps({"k\u00e9y": 'a"b\\c\n\u00e9\U0001f600/'}, ensure_ascii=True)
    assert decode_json(text) == {"k\u00e9y": 'a"b\\c\n\u00e9\U0001f600/'}
    assert decode_json(" \n [ 1 , 2 ] \t") == [1, 2]
    assert decode_json('"\\/"') == "/"


@pytest.mark.parametrize(
    "text",
    ["", "[1,]", "{'a': 1}", "[1] 2", "NaN", "01", "1.", '"open', '{"a" 1}', "tru", '"\\ud800"'],
)
def test_malformed_json_raises_serialization_error_with_position(text: str) -> None:
    with pytest.raises(SerializationError, match=r"cannot decode JSON: .* at line \d+, column \d+"):
        decode_json(text)


def test_deeply_nested_json_is_refused_without_crashing() -> None:
    with pytest.raises(SerializationError, match="nesting exceeds"):
        decode_json("[" * 100_000 + "]" * 100_000)


def test_decoding_accepts_1024_levels_of_nesting_and_refuses_a_value_deeper() -> None:
    assert decode_json("[" * 1024 + "1" + "]" * 1024) is not None
    assert decode_json("[" * 1025 + "]" * 1025) is not None  # an empty innermost container
    assert decode_json('{"a":' * 1024 + "{}" + "}" * 1024) is not None
    for text in ("[" * 1025 + "1" + "]" * 1025, '{"a":' * 1025 + "1" + "}" * 1025):
        with pytest.raises(SerializationError, match=r"nesting exceeds 1024 levels at line 1, column"):
            decode_json(text)


def test_an_integer_too_long_for_python_is_a_serialization_error_naming_the_limit() -> None:
    text = '{"n": ' + "9" * 100_000 + "}"
    # CPython 3.10 says "limit (4300)", 3.11+ "limit (4300 digits)".
    limit = r"cannot decode JSON: .*limit \(4300( digits)?\).* at line 1, column"
    with pytest.raises(SerializationError, match=limit) as info:
        decode_json(text)
    assert isinstance(info.value.__cause__, ValueError)


# --- dates, ids, numbers, enums --------------------------------------------------------------


def test_aware_datetimes_keep_their_offset_and_naive_ones_stay_naive() -> None:
    aware = datetime(
        2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30))
    )
    naive = datetime(2024, 5, 1, 12, 30)
    assert decode_json(encode_json(aware)) == "2024-05-01T12:30:15.123456+05:30"
    assert decode_json(encode_json(naive)) == "2024-05-01T12:30:00"
    back = rebuild(
        PlainDataclass, {"name": "n", "when": aware.isoformat(), "big": 1, "ratio": 1}
    )
    assert back.when == aware and back.when.utcoffset() == timedelta(hours=5, minutes=30)
    back = rebuild(
        PlainDataclass, {"name": "n", "when": naive.isoformat(), "big": 1, "ratio": 1}
    )
    assert back.when == naive and back.when.tzinfo is None


def test_datetimes_dates_and_times_encode_exactly_as_isoformat_writes_them() -> None:
    zones: list[Any] = [
        None,
        timezone.utc,
        timezone(timedelta(hours=-7)),
        timezone(timedelta(hours=5, minutes=45)),
        timezone(timedelta(seconds=-3661, microseconds=5)),
    ]
    with contextlib.suppress(ImportError, LookupError):  # no tz database: fixed offsets only
        from zoneinfo import ZoneInfo

        zones += [ZoneInfo("Europe/Paris"), ZoneInfo("America/St_Johns")]

    class MyDateTime(datetime):
        pass

    for tz in zones:
        for dt in (
            datetime(2024, 7, 1, 9, 5, 3, tzinfo=tz),
            datetime(5, 1, 2, 0, 0, 0, 7, tzinfo=tz),
            datetime(2024, 1, 15, 23, 59, 59, 999999, tzinfo=tz),
            MyDateTime(2024, 3, 31, 2, 30, tzinfo=tz),
        ):
            assert decode_json(encode_json(dt)) == dt.isoformat()
        assert (
            decode_json(encode_json(time(1, 2, 3, 4, tzinfo=tz)))
            == time(1, 2, 3, 4, tzinfo=tz).isoformat()
        )
    assert decode_json(encode_json(date(5, 6, 7))) == "0005-06-07"


def test_dates_times_uuids_and_decimals_encode_as_strings() -> None:
    u = uuid4()
    value = [date(2024, 2, 29), time(23, 59, 59, 1), time(1, 2, tzinfo=timezone.utc), u]
    assert decode_json(encode_json(value)) == [
        "2024-02-29",
        "23:59:59.000001",
        "01:02:00+00:00",
        str(u),
    ]
    exact = Decimal("3.141592653589793238462643383279502884197")
    assert decode_json(encode_json(exact)) == str(exact)
    assert Decimal(decode_json(encode_json(exact))) == exact


def test_enum_members_encode_as_their_values_also_as_dict_keys() -> None:
    assert (
        encode_json([Color.RED, Level.HIGH, Kind.PLACED])
        == '["red",2,"order.placed"]'
    )
    assert encode_json({Color.GREEN: 1, Kind.PLACED: 2}) == '{"green":1,"order.placed":2}'


# --- event classes ---------------------------------------------------------------------------


def test_plain_domain_event_round_trips_without_calling_its_init() -> None:
    event = PlainPlaced("o-1", 12.5, lines=3)
    back = roundtrip(event)
    assert type(back) is PlainPlaced
    assert (back.order_id, back.amount, back.lines) == ("o-1", 12.5, ["line-0", "line-1", "line-2"])
    assert back.placed_at == event.placed_at  # converted by the class-level annotation
    assert not hasattr(back, "_cache")  # private attributes are not stored


def test_plain_domain_event_encodes_the_same_after_its_defaults_were_read() -> None:
    event = PlainPlaced("o-2", 1.0)
    before = encode_json(event)
    _ = (
        event.event_id,
        event.event_type,
        event.aggregate_id,
        event.correlation_id,
        event.occurred_at,
    )
    assert encode_json(event) == before
    assert "event_id" not in decode_json(before)


def test_domain_event_identity_is_restored_when_the_data_has_it() -> None:
    event = PlainPlaced("o-3", 2.0)
    data = decode_json(encode_json(event))
    data.update(
        event_id=event.event_id,
        occurred_at=event.occurred_at.isoformat(),
        correlation_id="corr-1",
        causation_id="cause-1",
    )
    back = rebuild(PlainPlaced, data)
    assert back.event_id == event.event_id
    assert back.occurred_at == event.occurred_at
    assert (back.correlation_id, back.causation_id) == ("corr-1", "cause-1")

    shipped = FrozenShipped(
        uuid4(), date(2024, 1, 2), (time(8), time(17)), Level.LOW, 1.0
    )
    data = {
        **decode_json(encode_json(shipped)),
        "event_id": "e-9",
        "occurred_at": "2024-01-02T03:04:05+00:00",
    }
    back = rebuild(FrozenShipped, data)
    assert back.event_id == "e-9"
    assert back.occurred_at == datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    assert back.correlation_id == "e-9"  # a root event's own id, as before storing


def test_dataclass_domain_event_with_nested_dataclasses_lists_and_dicts_round_trips() -> None:
    event = OrderPlaced(
        order_id="o-4",
        lines=[
            Line("a", Decimal("1.10")),
            Line("b", Decimal("0.000000000000000000001"), 3),
        ],
        address=Address("1 Main St", "Springfield"),
        color=Color.GREEN,
        placed_at=datetime(2024, 5, 1, tzinfo=timezone.utc),
        totals={"net": Decimal("99999999999999999999.99")},
        tags={"gift", "express"},
    )
    data = decode_json(encode_json(event))
    assert list(data) == [
        "order_id",
        "lines",
        "address",
        "color",
        "placed_at",
        "note",
        "totals",
        "tags",
    ]
    back = rebuild(OrderPlaced, data)
    assert back == event
    assert type(back.lines[0]) is Line and back.color is Color.GREEN
    assert back.tags == {"gift", "express"}


def test_frozen_dataclass_event_round_trips_with_its_init_false_field() -> None:
    event = FrozenShipped(
        uuid4(), date(2024, 1, 2), (time(8), time(17, 30)), Level.HIGH, 2
    )
    back = roundtrip(event)
    assert back == event
    assert isinstance(back.parcel_id, UUID) and back.level is Level.HIGH
    assert isinstance(back.weight, float) and back.window == (time(8), time(17, 30))
    assert back.label == f"parcel {event.parcel_id}"


def test_plain_dataclass_round_trips_and_init_false_fields_are_set_after_construction() -> None:
    event = PlainDataclass("n", datetime(2024, 1, 1), 10**30, 0.5, Address("s", "c"))
    event.computed = 42
    back = roundtrip(event)
    assert back == event and back.computed == 42 and back.big == 10**30
    assert (
        rebuild(
            PlainDataclass, {"name": "n", "when": "2024-01-01T00:00:00", "big": 1, "ratio": 2}
        ).ratio
        == 2.0
    )


def test_pydantic_models_round_trip() -> None:
    try:
        import pydantic
    except ImportError as e:
        unavailable(f"pydantic is not importable ({e}); pip install pydantic")

    class ModelLine(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        sku: str
        price: Decimal

    class Model(pydantic.BaseModel):  # type: ignore[misc, name-defined]
        id: UUID
        at: datetime
        color: Color
        lines: list[ModelLine]
        note: str | None = None

    model = Model(
        id=uuid4(),
        at=datetime(2024, 5, 1, 9, tzinfo=timezone.utc),
        color=Color.RED,
        lines=[ModelLine(sku="a", price=Decimal("0.10"))],
    )
    data = decode_json(encode_json(model))
    assert data["lines"] == [{"sku": "a", "price": "0.10"}]
    back = rebuild(Model, data)
    assert back == model


def test_objects_with_a_dict_encode_their_public_attributes() -> None:
    class Point:
        def __init__(self) -> None:
            self.x, self.y, self._hidden = 1, 2, 3

    assert encode_json(Point()) == '{"x":1,"y":2}'


# --- registry --------------------------------------------------------------------------------


def test_domain_event_subclasses_register_themselves_under_their_type_key() -> None:
    assert lookup("PlainPlaced") is PlainPlaced
    assert lookup("FrozenShipped") is FrozenShipped
    assert lookup("codec.typed") is Typed
    assert lookup("order.placed") is EnumTyped
    assert lookup(Kind.PLACED) is EnumTyped
    assert lookup("PlainDataclass") is PlainDataclass
    assert lookup("CodecNeverDefined") is None


def test_type_key_follows_the_bus_rule() -> None:
    assert type_key(Typed) == Typed().event_type == "codec.typed"
    assert type_key(OrderPlaced) == "OrderPlaced"

    @dataclass
    class FieldTyped(DomainEvent):
        x: int
        event_type: str = "codec.field"

    assert type_key(FieldTyped) == FieldTyped(1).event_type == "codec.field"
    assert lookup("codec.field") is FieldTyped


def test_register_event_returns_the_class_and_wins_over_automatic_registration() -> None:
    @register_event
    class Explicit(DomainEvent):
        pass

    first = Explicit

    class Explicit(DomainEvent):  # type: ignore[no-redef]  # same key, automatic
        pass

    assert lookup("Explicit") is first


def test_rebuild_failures_name_the_class_and_field() -> None:
    with pytest.raises(
        SerializationError, match=r"cannot rebuild PlainDataclass\.when from 'yesterday'"
    ):
        rebuild(PlainDataclass, {"name": "n", "when": "yesterday", "big": 1, "ratio": 1.0})
    with pytest.raises(SerializationError, match="cannot rebuild PlainDataclass from fields"):
        rebuild(PlainDataclass, {"name": "n"})  # required fields missing
    with pytest.raises(SerializationError, match="expected a dict"):
        rebuild(PlainDataclass, [1, 2])  # type: ignore[arg-type]


# --- refusals --------------------------------------------------------------------------------


def test_unsupported_value_error_names_the_field_path_and_the_type() -> None:
    order = BadOrder([PricedItem(1), PricedItem(2), PricedItem(3 + 4j)])
    with pytest.raises(SerializationError) as info:
        encode_json(order)
    message = str(info.value)
    assert message.startswith(
        "cannot encode BadOrder.items[2].price: value of type 'complex' is not JSON-encodable (supported: "
    )
    assert isinstance(info.value, OxbusError) and isinstance(info.value, TypeError)
    assert oxbus.errors.SerializationError is SerializationError


def test_dict_paths_name_the_key() -> None:
    with pytest.raises(
        SerializationError, match=r"cannot encode dict\[\"meta\"\]\[0\]: value of type 'bytes'"
    ):
        encode_json({"meta": [b"raw"]})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinite_floats_are_refused(value: float) -> None:
    with pytest.raises(
        SerializationError,
        match=r"cannot encode PricedItem\.price: float -?(nan|inf) is not JSON-encodable",
    ):
        encode_json(PricedItem(value))


@pytest.mark.parametrize("key", [1, 1.5, None, (1, 2), Level.LOW])
def test_non_str_dict_keys_are_refused(key: Any) -> None:
    with pytest.raises(
        SerializationError,
        match=r"cannot encode PricedItem\.price: dict key .* of type '\w+' is not a str",
    ):
        encode_json(PricedItem({key: 1}))


def test_self_referencing_containers_are_refused_with_a_clear_error() -> None:
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(
        SerializationError,
        match=r"cannot encode dict\[\"self\"\]\[\"self\"\].*nesting exceeds 255 levels \(is there a reference cycle\?\)",
    ):
        encode_json(d)
    items: list[Any] = [1]
    items.append(items)
    with pytest.raises(SerializationError, match="reference cycle"):
        encode_json(items)
    item = PricedItem(None)
    item.price = item
    with pytest.raises(SerializationError, match=r"PricedItem\.price\.price.*reference cycle"):
        encode_json(item)


def test_deepest_nesting_fits_in_a_small_thread_stack() -> None:
    # In a subprocess: a stack overflow would kill the interpreter, not fail a test.
    script = textwrap.dedent(
        """
        import threading
        from dataclasses import dataclass
        from typing import Any
        from oxbus._oxbus import decode_json, encode_json

        @dataclass
        class Node:
            child: Any

        class Plain:
            def __init__(self, child):
                self.child = child

        def run():
            for make in (Node, Plain, lambda c: {"k": c}, lambda c: [c]):
                value = 1
                for _ in range(254):
                    value = make(value)
                encode_json(value)
            decode_json("[" * 1024 + "]" * 1024)
            print("ok")

        threading.stack_size(256 * 1024)
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr


def test_bytes_functions_sockets_and_slots_only_objects_are_refused() -> None:
    with socket.socket() as sock:
        cases = [
            b"x",
            bytearray(b"x"),
            len,
            lambda: 1,
            sock,
            SlotsOnly(),
            1j,
            object(),
            Line,
            ValueError("x"),
        ]
        for value in cases:
            with pytest.raises(
                SerializationError,
                match=f"value of type '{type(value).__name__}' is not JSON-encodable",
            ):
                encode_json({"v": value})


def test_lone_surrogates_are_refused() -> None:
    with pytest.raises(
        SerializationError, match=r"cannot encode list\[0\]: str contains a lone surrogate"
    ):
        encode_json(["\ud800"])
    with pytest.raises(
        SerializationError, match="cannot encode dict: str contains a lone surrogate"
    ):
        encode_json({"\udfff": 1})


def test_errors_raised_while_reading_a_value_are_wrapped_with_its_path() -> None:
    class Exploding(enum.Enum):
        A = 1

    class Bad:
        @property
        def __dict__(self) -> Any:  # type: ignore[override]
            raise RuntimeError("boom")

    with pytest.raises(
        SerializationError,
        match=r"cannot encode PricedItem\.price: reading it raised RuntimeError: boom",
    ) as info:
        encode_json(PricedItem(Bad()))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert encode_json(Exploding.A) == "1"


def test_dataclass_fields_of_every_kind_are_encoded_only_when_public() -> None:
    data = decode_json(
        encode_json(
            OrderPlaced("o", [], Address("s", "c"), Color.RED, datetime(2024, 1, 1))
        )
    )
    assert "_secret" not in data
    assert {f.name for f in dataclasses.fields(OrderPlaced)} - set(data) == {"_secret"}
